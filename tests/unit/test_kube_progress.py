"""The watcher's write-ahead memory (kube/progress.py): one private file per claimed operation, read back
whole by the next daemon, whatever else is in the directory."""

import json
import stat

from unbounded_agent.kube.progress import ACCEPTED, DONE, SUBMITTED, OperationProgress, ProgressStore


def test_a_claim_survives_the_daemon_and_stays_private(tmp_path):
    store = ProgressStore(tmp_path)
    p = OperationProgress(uid="u-1", name="up", kind="AgentUpgrade", operation="up@u-1",
                          params={"downloadURL": "https://h/x.tar.gz?sig=secret"}, request_id="mop-1", step=SUBMITTED)
    store.save(p)
    path = tmp_path / "machineoperations" / "u-1.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # the URL may carry a signed query
    (back,) = store.load_all().values()
    assert back == p and back.updated_at and not back.done
    back.step = DONE
    assert back.done


def test_unreadable_files_and_files_under_another_name_are_ignored(tmp_path):
    store = ProgressStore(tmp_path)
    store.save(OperationProgress(uid="good", name="a", kind="AgentReset"))
    (store.dir / "corrupt.json").write_text("{half a docu")
    (store.dir / "moved.json").write_text(json.dumps({"uid": "other", "name": "b", "kind": "AgentReset"}))
    (store.dir / "notes.txt").write_text("not a progress file")
    assert list(store.load_all()) == ["good"]


def test_a_file_of_an_older_agent_loads_and_unknown_keys_are_ignored(tmp_path):
    """The progress file of the agent before the operation queue: its own steps and keys."""
    store = ProgressStore(tmp_path)
    store.dir.mkdir(parents=True)
    old = {"uid": "u-2", "name": "up", "kind": "AgentUpgrade", "step": "upgrade-started", "operation": "up@u-2",
           "claimed_at": "2026-01-01T00:00:00Z", "params": {"downloadURL": "https://h/x.tar.gz"},
           "written": False, "gone": False, "attempts": 0, "want": None, "run_id": None}
    (store.dir / "u-2.json").write_text(json.dumps(old))
    p = store.load_all()["u-2"]
    assert (p.step, p.operation, p.request_id, p.want) == ("upgrade-started", "up@u-2", None, None)


def test_remove_forgets_and_a_missing_directory_is_empty(tmp_path):
    store = ProgressStore(tmp_path / "absent")
    assert store.load_all() == {}
    store.save(OperationProgress(uid="u", name="n", kind="AgentReset", step=ACCEPTED))
    store.remove("u")
    store.remove("u")  # twice: already gone is fine
    assert store.load_all() == {}


def test_once_a_reset_removed_the_state_dir_progress_lives_in_memory_and_nothing_is_written_back(tmp_path):
    import shutil

    state = tmp_path / "state"
    state.mkdir()
    store = ProgressStore(state)
    p = OperationProgress(uid="u-1", name="reset", kind="AgentReset", step=SUBMITTED, request_id="mop-1")
    store.save(p)
    shutil.rmtree(state)  # remove-agent, while the daemon still runs
    p.step = DONE
    store.save(p)  # no error, and the directory is not made again
    store.remove("u-1")
    assert store.in_memory and not state.exists()


def test_a_state_dir_that_never_existed_is_made_on_the_first_save(tmp_path):
    store = ProgressStore(tmp_path / "new-state")  # as the fast tests and a first start without systemd
    store.save(OperationProgress(uid="u-1", name="up", kind="AgentUpgrade", step=ACCEPTED))
    assert not store.in_memory and (tmp_path / "new-state" / "machineoperations" / "u-1.json").exists()
