"""The download's overall deadline: a watchdog that shuts the transfer's sockets down when time is up, and a
requests session whose connections hand every socket they open to it.
"""

import socket
import threading


class Watchdog:
    """Enforces the overall deadline by shutting down the transfer's sockets when it passes.

    Timeouts alone cannot: a read timeout restarts with every byte, so a server trickling one byte a
    second keeps a read going forever, and a single read call may wait for many bytes. Shutting a
    socket down wakes any read blocked on it, in any thread; the transfer then sees ``fired``.

    It holds the socket objects themselves (not file descriptors), so a socket closed meanwhile is simply
    skipped and a recycled descriptor is never touched. Not covered: the TCP connect, and the TLS handshake,
    while ``ssl`` has detached the plain socket to wrap it. Both are bounded as a whole by the connect
    timeout (Python's ``ssl`` applies a socket timeout to the whole handshake, not to each read).
    """

    def __init__(self, seconds: float):
        self.fired = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._done = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.fired:
                shutdown(sock)

    def _fire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.fired = True
            for sock in self._sockets:
                shutdown(sock)

    def cancel(self) -> None:
        with self._lock:
            self._done = True
            self._sockets.clear()
        self._timer.cancel()


def shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # unlike close(), wakes a recv() blocked in another thread
    except OSError:
        pass  # closed, detached or never connected: nothing to wake


def session(watchdog: Watchdog):
    """A requests session whose connections hand every socket they use to the watchdog."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    def watched(pool_cls):
        class Connection(pool_cls.ConnectionCls):
            # http.client drops ``sock`` as soon as a "Connection: close" response begins (the response
            # keeps reading from it), so catch each socket when it is assigned rather than look later.
            @property
            def sock(self):
                return self.__dict__.get("_watched_sock")

            @sock.setter
            def sock(self, value):
                self.__dict__["_watched_sock"] = value
                if value is not None:
                    watchdog.watch(value)

        return type(pool_cls.__name__, (pool_cls,), {"ConnectionCls": Connection})

    pools = {"http": watched(HTTPConnectionPool), "https": watched(HTTPSConnectionPool)}

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = pools

        def proxy_manager_for(self, proxy, **kwargs):
            manager = super().proxy_manager_for(proxy, **kwargs)
            if not proxy.lower().startswith("socks"):  # SOCKS managers need their own pool classes
                manager.pool_classes_by_scheme = pools
            return manager

    session = requests.Session()
    for prefix in ("https://", "http://"):
        session.mount(prefix, Adapter())
    return session
