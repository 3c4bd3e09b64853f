#!/usr/bin/python3
"""A small file server for test hosts: HTTPS on one port, plain HTTP on another.

It runs inside a test host as a systemd service (see TestHost.start_https), serving
--dir over both. Besides plain files, a few paths make the misbehaving servers that
download tests need:

    /redirect-http/<name>   302 to http://localhost:<http port>/<name>  (a downgrade)
    /redirect/<name>        302 to /<name> on the same server
    /status/<code>          an empty response with that status, e.g. /status/404
    /truncate/<name>        announces the file's full length, sends half, closes
    /short-length/<name>    announces half the file's length, sends all of it (a Content-Length lying short)
    /stall-body/<name>      the headers of the file, then nothing (for STALL_SECONDS)
    /trickle/<name>         the file, one byte every TRICKLE_SECONDS
    /loop/<n>               302 to /loop/<1-n>: a redirect loop
    /huge-length            announces 10**15 bytes, sends none
    /negative-length        Content-Length: -1

Standard library only; it notifies systemd (Type=notify) once both ports listen.
"""

import argparse
import http.server
import os
import socket
import ssl
import threading
from functools import partial

STALL_SECONDS = 600  # far longer than any download deadline a test sets
TRICKLE_SECONDS = 0.1  # far shorter than any read timeout a test sets
STOP = threading.Event()  # set to end stalls and trickles at once (a server run inside the tests' process)


class DualStackServer(http.server.ThreadingHTTPServer):
    """Listens on :: with IPv4 mapped, so both 127.0.0.1 and ::1 (localhost) reach it."""

    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class Handler(http.server.SimpleHTTPRequestHandler):
    http_port = 8080  # set from the command line
    timeout = 30  # seconds; a stalled client frees its thread

    def setup(self):
        super().setup()
        # The TLS handshake happens here, in the request's thread, so one stalled
        # client cannot block the accept loop.
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()

    def do_GET(self):
        if self._special():
            return
        super().do_GET()

    def do_HEAD(self):
        if self._special():
            return
        super().do_HEAD()

    def _special(self) -> bool:
        """Handle the test behaviours; return False for an ordinary file request."""
        path = self.path.split("?", 1)[0]
        if path.startswith("/redirect-http/"):
            self._redirect(f"http://localhost:{self.http_port}/{path[len('/redirect-http/'):]}")
        elif path.startswith("/redirect/"):
            self._redirect("/" + path[len("/redirect/"):])
        elif path.startswith("/status/"):
            code = int(path[len("/status/"):])
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path.startswith("/truncate/"):
            self._hostile(path[len("/truncate/"):], lambda n: n, lambda data: self.wfile.write(data[: len(data) // 2]))
        elif path.startswith("/short-length/"):
            self._hostile(path[len("/short-length/"):], lambda n: n // 2, lambda data: self.wfile.write(data))
        elif path.startswith("/stall-body/"):
            self._hostile(path[len("/stall-body/"):], lambda n: n, lambda data: STOP.wait(STALL_SECONDS))
        elif path.startswith("/trickle/"):
            self._hostile(path[len("/trickle/"):], lambda n: n, self._trickle)
        elif path.startswith("/loop/"):
            self._redirect(f"/loop/{1 - int(path[len('/loop/'):])}")
        elif path in ("/huge-length", "/negative-length"):
            self.send_response(200)
            self.send_header("Content-Length", str(10**15 if path == "/huge-length" else -1))
            self.end_headers()
            self.close_connection = True
        else:
            return False
        return True

    def _hostile(self, name: str, announce, send) -> None:
        """The file's headers with Content-Length announce(size), then send(data) for the body."""
        file = self.translate_path("/" + name)
        if not os.path.isfile(file):
            self.send_error(404)
            return
        with open(file, "rb") as f:
            data = f.read()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(announce(len(data))))
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        if self.command != "HEAD":
            try:
                send(data)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass  # the client gave up, as it should

    def _trickle(self, data: bytes) -> None:
        for i in range(len(data)):
            self.wfile.write(data[i : i + 1])
            self.wfile.flush()
            if STOP.wait(TRICKLE_SECONDS):
                return

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


def notify_ready() -> None:
    """sd_notify(READY=1) without libsystemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(b"READY=1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument("--http-port", type=int, default=8080)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()

    Handler.http_port = args.http_port
    handler = partial(Handler, directory=args.dir)

    https = DualStackServer(("::", args.port), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    https.socket = context.wrap_socket(https.socket, server_side=True,
                                       do_handshake_on_connect=False)
    plain = DualStackServer(("::", args.http_port), handler)

    threading.Thread(target=plain.serve_forever, daemon=True).start()
    notify_ready()
    https.serve_forever()


if __name__ == "__main__":
    main()
