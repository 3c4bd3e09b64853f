"""The copy of the agent's config and credentials a reset keeps for its report: once per run, complete or not at
all, replaced for another run, kept when a resumed run finds the originals gone, and released."""

import yaml

from unbounded_agent.reset import reporter_kit


def agent(tmp_path, kube=True):
    etc = tmp_path / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "kubeconfig").write_text("current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
                                    "clusters: [{name: k, cluster: {server: 'https://127.0.0.1:1'}}]\n"
                                    "users: [{name: u, user: {token: t1}}]\n")
    (etc / "config.yaml").write_text("machineName: m\n" + (f"kubeconfig: {etc / 'kubeconfig'}\n" if kube else ""))
    reset = tmp_path / "reset"
    reset.mkdir(exist_ok=True)
    return str(etc / "config.yaml"), reset


def token(reset) -> str:
    return yaml.safe_load((reset / "reporter" / "kubeconfig").read_text())["users"][0]["user"]["token"]


def test_kept_once_per_run_and_replaced_for_another(tmp_path):
    cfg, reset = agent(tmp_path)
    assert reporter_kit.config_path(reset) is None and reporter_kit.held_for(reset) is None
    reporter_kit.hold(reset, "run-1", cfg)
    assert reporter_kit.held_for(reset) == "run-1" and token(reset) == "t1"
    assert reporter_kit.config_path(reset) == reset / "reporter" / "config.yaml"
    (tmp_path / "etc" / "kubeconfig").write_text((tmp_path / "etc" / "kubeconfig").read_text().replace("t1", "t2"))
    assert "kept already" in reporter_kit.hold(reset, "run-1", cfg)
    assert token(reset) == "t1"
    reporter_kit.hold(reset, "run-2", cfg)
    assert reporter_kit.held_for(reset) == "run-2" and token(reset) == "t2"
    assert [p.name for p in reset.iterdir()] == ["reporter"]  # no temporaries left


def test_a_resumed_run_whose_originals_are_gone_keeps_the_earlier_copy(tmp_path):
    cfg, reset = agent(tmp_path)
    reporter_kit.hold(reset, "run-1", cfg)
    (tmp_path / "etc" / "config.yaml").unlink()
    assert "earlier run" in reporter_kit.hold(reset, "run-2", cfg)
    assert reporter_kit.held_for(reset) == "run-2" and token(reset) == "t1"


def test_nothing_is_kept_without_a_kubeconfig_and_an_incomplete_copy_is_none(tmp_path):
    cfg, reset = agent(tmp_path, kube=False)
    assert "no kubeconfig" in reporter_kit.hold(reset, "run-1", cfg)
    assert not (reset / "reporter").exists()
    (reset / "reporter").mkdir()
    (reset / "reporter" / "kubeconfig").write_text("x")  # cut short before its config was written
    assert reporter_kit.config_path(reset) is None and reporter_kit.held_for(reset) is None
    assert reporter_kit.release(reset) and not (reset / "reporter").exists() and not reporter_kit.release(reset)
