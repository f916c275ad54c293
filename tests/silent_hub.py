"""A Hub that hangs, for tests: a TCP socket on 127.0.0.1 that accepts connections and never answers.

Bounded: it accepts at most ``max_connections`` connections and stops by itself after ``lifetime`` seconds;
``stop()`` (or leaving the ``with`` block) closes every socket and joins the thread.
"""

from __future__ import annotations

import socket
import threading
import time


class SilentServer:
    def __init__(self, lifetime: float = 120.0, max_connections: int = 64) -> None:
        self.lifetime = lifetime
        self.max_connections = max_connections
        self.accepted = 0
        """Connections accepted so far (a test can check that nothing was asked)."""
        self.requests: list[str] = []
        """The request line (``GET /path``) each connection sent, read but never answered."""
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self) -> SilentServer:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._listener.settimeout(0.1)  # the loop checks for stop() ten times a second
        self._thread = threading.Thread(target=self._accept_loop, name="silent-hub", daemon=True)
        self._thread.start()
        return self

    def _accept_loop(self) -> None:
        deadline = time.monotonic() + self.lifetime
        while not self._stop.is_set() and time.monotonic() < deadline and self.accepted < self.max_connections:
            try:
                connection, _ = self._listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:  # the listener was closed
                return
            self.accepted += 1
            self._open.append(connection)  # held open, never answered
            self.requests.append(_request_line(connection))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for connection in [*self._open, self._listener]:
            if connection is not None:
                connection.close()
        self._open.clear()

    def __enter__(self) -> SilentServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _request_line(connection: socket.socket) -> str:
    """``METHOD /path`` of the request a client sends right after connecting ('' if none within 0.5 s)."""
    connection.settimeout(0.5)
    try:
        head = connection.recv(4096)
    except OSError:
        return ""
    return " ".join(head.split(b"\r\n", 1)[0].decode("latin-1").split()[:2])
