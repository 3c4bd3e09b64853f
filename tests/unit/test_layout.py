"""Slots and links: first-install seeding, repair of missing links, and never touching a live layout."""

import os

from unbounded_agent import fsutil, layout


def agent(tmp_path, name="packaged", body="#!/bin/sh\necho unbounded-agent 9.9.9\n"):
    p = tmp_path / name
    p.write_text(body)
    p.chmod(0o755)
    return p


def test_seed_on_empty_dir_installs_blue_and_links(tmp_path):
    lay = layout.Layout(tmp_path / "bin")
    actions = lay.seed(agent(tmp_path))
    assert len(actions) == 3
    assert os.readlink(lay.path(layout.CURRENT)) == layout.BLUE
    assert os.readlink(lay.path(layout.LAST_GOOD)) == layout.BLUE
    assert os.readlink(lay.path(layout.COMPAT)) == layout.CURRENT
    assert lay.active_slot() == "unbounded-agent-blue"
    assert os.stat(lay.path(layout.BLUE)).st_mode & 0o777 == 0o755
    assert layout.binary_version(lay.path(layout.COMPAT)) == "9.9.9"


def test_seed_keeps_a_working_layout(tmp_path):
    lay = layout.Layout(tmp_path / "bin")
    lay.seed(agent(tmp_path))
    # an upgrade has since switched to green
    fsutil.atomic_copy(agent(tmp_path, "v2", "#!/bin/sh\necho unbounded-agent 2.0\n"), lay.path(layout.GREEN))
    fsutil.atomic_symlink(layout.GREEN, lay.path(layout.CURRENT))
    blue_before = lay.path(layout.BLUE).read_bytes()
    assert lay.seed(agent(tmp_path, "newer", "#!/bin/sh\necho unbounded-agent 3.0\n")) == []
    assert os.readlink(lay.path(layout.CURRENT)) == layout.GREEN
    assert lay.path(layout.BLUE).read_bytes() == blue_before


def test_seed_repairs_a_dangling_current_and_last_good(tmp_path):
    lay = layout.Layout(tmp_path / "bin")
    lay.bin_dir.mkdir()
    os.symlink(layout.GREEN, lay.path(layout.CURRENT))  # green does not exist
    os.symlink(layout.GREEN, lay.path(layout.LAST_GOOD))
    lay.seed(agent(tmp_path))
    assert lay.resolves(layout.CURRENT) == lay.path(layout.BLUE)
    assert lay.resolves(layout.LAST_GOOD) == lay.path(layout.BLUE)


def test_seed_never_overwrites_a_regular_file_at_the_compat_path(tmp_path):
    lay = layout.Layout(tmp_path / "bin")
    lay.bin_dir.mkdir()
    lay.path(layout.COMPAT).write_text("operator's own\n")
    actions = lay.seed(agent(tmp_path))
    assert lay.path(layout.COMPAT).read_text() == "operator's own\n"
    assert any("left" in a for a in actions)


def test_seed_removes_temporaries_of_an_interrupted_run(tmp_path):
    lay = layout.Layout(tmp_path / "bin")
    lay.bin_dir.mkdir()
    stale = lay.bin_dir / ".unbounded-agent-blue.tmp-deadbeef"
    stale.write_text("half")
    lay.seed(agent(tmp_path))
    assert not stale.exists()


def test_binary_version_of_a_failing_binary_is_none(tmp_path):
    assert layout.binary_version(agent(tmp_path, "bad", "#!/bin/sh\nexit 42\n")) is None
    assert layout.binary_version(tmp_path / "absent") is None
