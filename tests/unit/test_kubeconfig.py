"""A kubeconfig read as kubectl reads it: the files its current context names (relative to the kubeconfig), and
the same context flattened, with those files' content inline."""

import base64

import pytest

from unbounded_agent import kubeconfig

DOC = """\
current-context: mine
contexts:
- {name: other, context: {cluster: far, user: nobody}}
- {name: mine, context: {cluster: k, user: u, namespace: ns}}
clusters:
- {name: far, cluster: {server: "https://far:6443", certificate-authority: /nowhere/ca.crt}}
- {name: k, cluster: {server: "https://127.0.0.1:6443", certificate-authority: pki/ca.crt}}
users:
- {name: nobody, user: {token: x}}
- {name: u, user: {client-certificate: pki/client.crt, client-key: %s, tokenFile: token}}
"""


@pytest.fixture
def config(tmp_path):
    (tmp_path / "pki").mkdir()
    (tmp_path / "pki" / "ca.crt").write_bytes(b"CA\n")
    (tmp_path / "pki" / "client.crt").write_bytes(b"CRT")
    (tmp_path / "elsewhere.key").write_bytes(b"\x00KEY")
    (tmp_path / "token").write_text("tok\n")
    path = tmp_path / "kubeconfig"
    path.write_text(DOC % (tmp_path / "elsewhere.key"))
    return path


def test_the_files_of_the_current_context_only(config, tmp_path):
    assert kubeconfig.files(str(config)) == [str(config), str(tmp_path / "pki/ca.crt"), str(tmp_path / "pki/client.crt"),
                                             str(tmp_path / "elsewhere.key"), str(tmp_path / "token")]


def test_an_unreadable_kubeconfig_is_still_one_file_to_watch(tmp_path):
    (tmp_path / "kubeconfig").write_text(": not yaml [")
    assert kubeconfig.files(str(tmp_path / "kubeconfig")) == [str(tmp_path / "kubeconfig")]


def test_flattened_carries_the_current_context_with_every_file_inline(config):
    flat = kubeconfig.flattened(str(config))
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    assert flat == {
        "apiVersion": "v1", "kind": "Config", "current-context": "mine",
        "contexts": [{"name": "mine", "context": {"cluster": "k", "user": "u", "namespace": "ns"}}],
        "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:6443", "certificate-authority-data": b64(b"CA\n")}}],
        "users": [{"name": "u", "user": {"client-certificate-data": b64(b"CRT"), "client-key-data": b64(b"\x00KEY"),
                                         "token": "tok"}}]}


def test_flattening_fails_on_a_missing_file_or_no_current_context(config, tmp_path):
    (tmp_path / "token").unlink()
    with pytest.raises(FileNotFoundError):
        kubeconfig.flattened(str(config))
    (tmp_path / "none").write_text("clusters: []\n")
    with pytest.raises(ValueError, match="no current context"):
        kubeconfig.flattened(str(tmp_path / "none"))
    (tmp_path / "list").write_text("- a\n")
    with pytest.raises(ValueError, match="not a kubeconfig"):
        kubeconfig.flattened(str(tmp_path / "list"))
