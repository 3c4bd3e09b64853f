"""The session layer's cache (tests/support/testhost_layer.py), with the install faked: one build per .deb
(keyed by its digest), never a half-built layer, and the layers of other .debs removed when a new one is
built, except those a process holds."""

import fcntl
import os

import pytest
import testhost_layer


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache dir, the PKI and the install faked; yields the list of installs made."""
    installs = []

    def install(tree, deb, ca, scratch):
        assert ca.read_text() == "ca\n"
        installs.append(deb.name)
        (scratch / "root" / "installed").write_text(deb.read_text())

    def pki(d, days):
        d.mkdir()
        for name in ("ca.crt", "ca.key", "ca.srl", "server.crt", "server.key", "server.csr", "server.ext"):
            (d / name).write_text(name.split(".")[0] + "\n")

    monkeypatch.setattr(testhost_layer, "_install", install)
    monkeypatch.setattr(testhost_layer, "make_test_pki", pki)
    monkeypatch.setattr(testhost_layer.testhost_tree, "install_interrupt_handlers", lambda: None)
    monkeypatch.setattr(testhost_layer.testhost_tree, "cache_dir_default", lambda: tmp_path / "cache")
    yield installs
    testhost_layer.release_all()


def deb(tmp_path, text: str):
    path = tmp_path / f"{text}.deb"
    path.write_text(text)
    return path


def layers(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "cache" / "layers").iterdir() if p.name.startswith(("layer-", "build-", "trash-")))


def test_a_layer_is_built_once_and_kept_for_the_next_run(cache, tmp_path):
    v1 = deb(tmp_path, "v1")
    layer = testhost_layer.acquire(v1, tmp_path)
    assert (layer.root / "installed").read_text() == "v1"
    assert sorted(p.name for p in layer.pki.iterdir()) == ["ca.crt", "server.crt", "server.key"]
    assert testhost_layer.acquire(v1, tmp_path) == layer  # in this process
    testhost_layer.release_all()
    assert testhost_layer.acquire(v1, tmp_path) == layer  # in the next one
    assert cache == ["v1.deb"]


def test_a_changed_deb_gets_its_own_layer_and_the_old_one_goes(cache, tmp_path):
    v1 = deb(tmp_path, "v1")
    old = testhost_layer.acquire(v1, tmp_path)
    testhost_layer.release_all()
    v1.write_text("v1, changed")  # same name, other content
    new = testhost_layer.acquire(v1, tmp_path)
    assert new.root != old.root and (new.root / "installed").read_text() == "v1, changed"
    assert not old.root.parent.exists()
    assert layers(tmp_path) == sorted([new.root.parent.name, new.root.parent.name + ".lock"])


def test_a_layer_in_use_elsewhere_is_kept(cache, tmp_path):
    old = testhost_layer.acquire(deb(tmp_path, "v1"), tmp_path)
    testhost_layer.release_all()
    other = os.open(f"{old.root.parent}.lock", os.O_RDONLY)  # another run, using it
    fcntl.flock(other, fcntl.LOCK_SH)
    try:
        new = testhost_layer.acquire(deb(tmp_path, "v2"), tmp_path)
        assert (old.root / "installed").read_text() == "v1" and (new.root / "installed").read_text() == "v2"
    finally:
        os.close(other)
    testhost_layer.release_all()
    newest = testhost_layer.acquire(deb(tmp_path, "v3"), tmp_path)  # then no one holds v1 or v2: both go
    assert layers(tmp_path) == sorted([newest.root.parent.name, newest.root.parent.name + ".lock"])


def test_a_failed_build_leaves_nothing_and_the_next_one_builds(cache, tmp_path, monkeypatch):
    def broken(tree, deb, ca, scratch):
        (scratch / "root" / "half").write_text("")
        raise RuntimeError("dpkg -i failed")

    v1 = deb(tmp_path, "v1")
    with monkeypatch.context() as m:
        m.setattr(testhost_layer, "_install", broken)
        with pytest.raises(RuntimeError, match="dpkg -i failed"):
            testhost_layer.acquire(v1, tmp_path)
    assert [n for n in layers(tmp_path) if not n.endswith(".lock")] == []
    assert (testhost_layer.acquire(v1, tmp_path).root / "installed").read_text() == "v1"


def test_the_key_names_the_debs_content_and_the_week(tmp_path):
    v1 = deb(tmp_path, "v1")
    week = 7 * 86400
    assert testhost_layer.layer_key(v1, now=10 * week) == testhost_layer.layer_key(v1, now=11 * week - 1)
    assert testhost_layer.layer_key(v1, now=10 * week) != testhost_layer.layer_key(v1, now=11 * week)
    before = testhost_layer.layer_key(v1, now=10 * week)
    v1.write_text("v1, changed")
    assert testhost_layer.layer_key(v1, now=10 * week) != before
