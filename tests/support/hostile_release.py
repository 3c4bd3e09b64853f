"""Release servers that misbehave on purpose, in the tests' own process, on loopback: the test host's file
server (https_server.py, with its hostile routes) over HTTPS and plain HTTP, and the same over HTTPS with a
certificate for another name.

    with ReleaseServers(tmp_dir) as servers:     # a test CA; REQUESTS_CA_BUNDLE makes the download trust it
        servers.put("good.tar.gz", path)
        servers.https("stall-body/good.tar.gz")  # https://127.0.0.1:<port>/stall-body/good.tar.gz
        servers.http("good.tar.gz"), servers.wrong_name("good.tar.gz")

The download verifies against the system CA bundle, which requests lets ``REQUESTS_CA_BUNDLE`` replace: the
caller sets it to ``servers.ca`` (the tests' monkeypatch), so the product's own code path is the one tested.
"""

from __future__ import annotations

import http.server
import shutil
import ssl
import subprocess
import threading
from functools import partial
from pathlib import Path

import https_server


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path) -> dict[str, Path]:
    """A test CA and two server certificates it signed: one for 127.0.0.1 and localhost, one for another name."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl(d, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=hostile-test-ca",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, san in (("server", "DNS:localhost,IP:127.0.0.1"), ("wrong-name", "DNS:release.example")):
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
        _openssl(d, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    return {"ca": d / "ca.crt", "server": d / "server", "wrong-name": d / "wrong-name"}


class _Handler(https_server.Handler):
    def log_message(self, *args):
        pass  # its access log names the URLs it was asked, secrets included: the tests look for leaks elsewhere


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients that give up (deadlines, TLS failures) are what these servers are for


class ReleaseServers:
    def __init__(self, work: Path):
        self.dir = work / "releases"
        self.dir.mkdir(parents=True, exist_ok=True)
        pki = make_pki(work / "pki")
        self.ca = str(pki["ca"])
        self.plain = self._start(None)
        https_server.Handler.http_port = self.plain.server_address[1]  # where /redirect-http/ sends clients
        self.secure = self._start(pki["server"])
        self.other_name = self._start(pki["wrong-name"])

    def _start(self, cert: Path | None) -> _Server:
        server = _Server(("127.0.0.1", 0), partial(_Handler, directory=str(self.dir)))
        if cert is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(f"{cert}.crt", f"{cert}.key")
            server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return server

    def put(self, name: str, source: Path | bytes) -> str:
        if isinstance(source, bytes):
            (self.dir / name).write_bytes(source)
        else:
            shutil.copyfile(source, self.dir / name)
        return name

    def https(self, path: str, host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.secure.server_address[1]}/{path}"

    def http(self, path: str) -> str:
        return f"http://127.0.0.1:{self.plain.server_address[1]}/{path}"

    def wrong_name(self, path: str) -> str:
        return f"https://127.0.0.1:{self.other_name.server_address[1]}/{path}"

    def close(self) -> None:
        https_server.STOP.set()  # ends stalls and trickles
        for server in (self.plain, self.secure, self.other_name):
            server.shutdown()
            server.server_close()
        https_server.STOP.clear()

    def __enter__(self) -> ReleaseServers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
