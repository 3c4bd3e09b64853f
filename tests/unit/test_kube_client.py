"""Credentials that rotate (kube/client.py): client certificates, bearer token files and exec plugins, loaded by
the kubernetes client from the kubeconfig, against the test API server's real authentication (x509 CN/O over
TLS, bearer tokens). A client whose credentials the server refuses (401), or whose files changed, is built
again; a refusal is "unavailable" (retried), never an answer about an object."""

import os
import stat
import sys

import pytest
import yaml
from kube_apiserver import start_apiserver
from watcher_fakes import AGENT, AGENT_GROUP, Harness, wait_for

from unbounded_agent.kube import client as kubeclient
from unbounded_agent.kube.client import Unavailable

WHOAMI = "/apis/authentication.k8s.io/v1/selfsubjectreviews"


@pytest.fixture
def server():
    s = start_apiserver(tls=True)
    yield s
    s.stop()


def whoami(kube) -> str:
    review = kube.request("POST", WHOAMI, body={"apiVersion": "authentication.k8s.io/v1",
                                                "kind": "SelfSubjectReview"}, content_type="application/json")
    return review["status"]["userInfo"]["username"]


def replace(path, data: bytes | str) -> None:
    """As a rotation tool does it: a new file renamed over the old one."""
    tmp = f"{path}.new"
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def test_the_files_a_kubeconfig_names_are_watched(server, tmp_path):
    crt, key, _ = server.issue_client_cert(tmp_path, AGENT, [AGENT_GROUP])
    kc = server.kubeconfig(tmp_path / "kc", credential={"client-certificate": os.path.basename(crt),
                                                        "client-key": key})
    assert kubeclient.credential_files(str(kc)) == [str(kc), crt, key]  # relative to the kubeconfig
    assert kubeclient.credential_files(None) == [kubeclient.IN_CLUSTER_TOKEN, kubeclient.IN_CLUSTER_CA]
    (tmp_path / "broken").write_text("{")
    assert kubeclient.credential_files(str(tmp_path / "broken")) == [str(tmp_path / "broken")]


def test_a_client_certificate_is_the_user_of_its_cn_in_the_groups_of_its_o(server, tmp_path):
    crt, key, _ = server.issue_client_cert(tmp_path, AGENT, [AGENT_GROUP, "other"])
    kube = kubeclient.build(server.kubeconfig(tmp_path / "kc", credential={"client-certificate": crt,
                                                                           "client-key": key}))
    review = kube.request("POST", WHOAMI, body={"apiVersion": "authentication.k8s.io/v1",
                                                "kind": "SelfSubjectReview"}, content_type="application/json")
    assert review["status"]["userInfo"]["username"] == AGENT
    assert set(review["status"]["userInfo"]["groups"]) == {AGENT_GROUP, "other", "system:authenticated"}


def test_a_rotated_client_certificate_is_loaded_again_and_the_revoked_one_refused(server, tmp_path):
    crt, key, serial = server.issue_client_cert(tmp_path, AGENT, [AGENT_GROUP], name="old")
    kc = server.kubeconfig(tmp_path / "kc", credential={"client-certificate": str(tmp_path / "agent.crt"),
                                                        "client-key": str(tmp_path / "agent.key")})
    replace(tmp_path / "agent.crt", open(crt, "rb").read())
    replace(tmp_path / "agent.key", open(key, "rb").read())
    client = kubeclient.Client(lambda: kubeclient.build(kc))
    assert whoami(client()) == AGENT and client.builds == 1
    # revoked before the new files are there: refused, and unavailable (not an answer), until they are
    server.revoke_client_cert(serial)
    with pytest.raises(Unavailable, match="refused the credentials: 401"):
        whoami(client())
    new_crt, new_key, _ = server.issue_client_cert(tmp_path, AGENT, [AGENT_GROUP], name="new")
    replace(tmp_path / "agent.crt", open(new_crt, "rb").read())
    replace(tmp_path / "agent.key", open(new_key, "rb").read())
    assert whoami(client()) == AGENT and client.builds == 2


def test_new_files_are_loaded_before_the_old_certificate_is_refused(server, tmp_path):
    crt, key, serial = server.issue_client_cert(tmp_path, AGENT, [AGENT_GROUP], name="old")
    kc = server.kubeconfig(tmp_path / "kc", credential={"client-certificate": crt, "client-key": key})
    client = kubeclient.Client(lambda: kubeclient.build(kc))
    assert whoami(client()) == AGENT
    new_crt, new_key, _ = server.issue_client_cert(tmp_path, AGENT, [AGENT_GROUP], name="new")
    server.kubeconfig(kc, credential={"client-certificate": new_crt, "client-key": new_key})  # kubeconfig rotated
    wait_for("the change to be seen", lambda: client() and client.builds == 2, poll=0.2)
    server.revoke_client_cert(serial)
    assert whoami(client()) == AGENT and client.builds == 2


def test_a_token_file_that_rotates(server, tmp_path):
    token_file = tmp_path / "token"
    old = server.add_user(AGENT, [AGENT_GROUP])
    replace(token_file, old)
    kc = server.kubeconfig(tmp_path / "kc", credential={"tokenFile": str(token_file)})
    client = kubeclient.Client(lambda: kubeclient.build(kc))
    assert whoami(client()) == AGENT
    replace(token_file, server.rotate_token(old))
    assert whoami(client()) == AGENT and client.builds == 2


def test_an_exec_plugin_is_run_again_when_its_token_is_refused(server, tmp_path):
    token_file = tmp_path / "issued"
    old = server.add_user(AGENT, [AGENT_GROUP])
    token_file.write_text(old)
    plugin = tmp_path / "credential-plugin"
    plugin.write_text(f"#!{sys.executable}\nimport json\n"
                      f"print(json.dumps({{'apiVersion': 'client.authentication.k8s.io/v1', 'kind': 'ExecCredential',"
                      f" 'status': {{'token': open({str(token_file)!r}).read().strip()}}}}))\n")
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
    kc = server.kubeconfig(tmp_path / "kc", credential={"exec": {
        "apiVersion": "client.authentication.k8s.io/v1", "command": str(plugin), "interactiveMode": "Never"}})
    client = kubeclient.Client(lambda: kubeclient.build(kc))
    assert whoami(client()) == AGENT
    token_file.write_text(server.rotate_token(old))  # the plugin's source rotated: no file the agent watches
    with pytest.raises(Unavailable, match="401"):
        whoami(client())
    assert whoami(client()) == AGENT and client.builds == 2


def test_status_writes_resume_after_the_certificate_rotates_without_a_restart(tmp_path):
    with Harness(tmp_path, client_cert=True) as h:
        w = h.start()
        h.create("up", "AgentUpgrade", downloadURL="https://releases.example.com/a.tar.gz")
        req = h.dispatcher.wait_request(h.operation("up"))
        h.wait_phase("up", "InProgress")
        _, _, serial = h.agent_cert
        h.server.revoke_client_cert(serial)  # the old certificate is refused from now on
        h.dispatcher.succeed(req, "upgraded from 1.0.0 to 2.0.0")
        wait_for("the refusal", lambda: any(r.code == 401 for r in h.server.find_requests(user_agent="unbounded-agent/")))
        assert h.phase("up") == "InProgress"
        # the new certificate and key are put in place (the kubeconfig names the same files)
        crt, key, _ = h.server.issue_client_cert(tmp_path, AGENT, [AGENT_GROUP], name="rotated")
        doc = yaml.safe_load(open(h.cfg.kubeconfig))
        replace(doc["users"][0]["user"]["client-certificate"], open(crt, "rb").read())
        replace(doc["users"][0]["user"]["client-key"], open(key, "rb").read())
        h.wait_phase("up", "Complete")
        assert w.client.builds >= 2 and h.watcher is w  # the same watcher: no restart
        assert h.condition("up")["reason"] == "Succeeded"
        wait_for("the last Event", lambda: "Completed" in h.event_reasons("up"))
        assert h.agent_requests()[-1].user == AGENT


def test_a_client_keeps_working_when_a_reset_removes_its_kubeconfig_and_certificate_files(server, tmp_path, monkeypatch):
    """A reset removes the agent's config before the daemon publishes the reset's Complete."""
    monkeypatch.setattr(kubeclient, "CHECK_FILES_EVERY", 0)
    crt, key, _ = server.issue_client_cert(tmp_path, AGENT, [AGENT_GROUP])
    kc = server.kubeconfig(tmp_path / "kc", credential={"client-certificate": crt, "client-key": key})
    client = kubeclient.Client(lambda: kubeclient.build(kc))
    assert whoami(client()) == AGENT
    for path in (kc, crt, key):
        os.unlink(path)
    client().api.rest_client.pool_manager.clear()  # new connections must not need the removed files either
    assert whoami(client()) == AGENT and client.builds == 1  # the same client, kept
