"""A real TCP proxy for the agent's reliability tests: the network between the agent and a server.

It relays bytes both ways on 127.0.0.1 and can break that on purpose:
- ``down()``: refuse every connection (accept and close at once) and cut the open ones: the network dropped;
- ``hold(pattern, *, request_bytes=None, response_bytes=None)``: on a connection whose request contains
  ``pattern``, forward only the first ``request_bytes`` of what follows it to the server (a request cut
  mid-body), or only the first ``response_bytes`` of the answer back to the client (a download cut mid-way),
  then stall until the connection is closed; ``held`` is set when that happens.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass


@dataclass
class Hold:
    pattern: bytes
    request_bytes: int | None = None
    response_bytes: int | None = None


class NetProxy:
    """``NetProxy(upstream_port)``; ``url`` is where clients connect. A context manager."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.is_down = False
        self.rule: Hold | None = None
        self.held = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def down(self) -> None:
        self.is_down = True
        with self._lock:
            for sock in list(self._open):
                _close(sock)
            self._open.clear()

    def up(self) -> None:
        self.is_down = False

    def hold(self, pattern: bytes, *, request_bytes: int | None = None, response_bytes: int | None = None) -> None:
        self.held.clear()
        self.rule = Hold(pattern, request_bytes, response_bytes)

    def release(self) -> None:
        """Forget the hold rule (stalled connections stay stalled until closed)."""
        self.rule = None

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.is_down:
                _close(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._open.update((client, upstream))
            state = {"triggered": 0, "sent_up": 0, "sent_down": 0}
            threading.Thread(target=self._pump, args=(client, upstream, state, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, state, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, state: dict[str, int], upward: bool) -> None:
        """Relay ``source`` -> ``sink``; once a hold stalls this direction, what comes is read and dropped, until
        ``source`` closes (the client killed, or done): then both sides are closed."""
        stalled = False
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if stalled:
                    continue
                rule = self.rule
                if upward and rule is not None and not state["triggered"] and rule.pattern in data:
                    state["triggered"] = 1
                    if rule.request_bytes is not None:
                        cut = data.index(rule.pattern)
                        sink.sendall(data[:cut])
                        data = data[cut:]
                limit = None
                if rule is not None and state["triggered"]:
                    limit = rule.request_bytes if upward else rule.response_bytes
                if limit is None:
                    sink.sendall(data)
                    continue
                key = "sent_up" if upward else "sent_down"
                room = max(limit - state[key], 0)
                sink.sendall(data[:room])
                state[key] += min(room, len(data))
                if len(data) >= room:
                    stalled = True
                    self.held.set()
        except OSError:
            pass
        finally:
            _close(source)
            _close(sink)

    def __enter__(self) -> NetProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        _close(self.listener)
        self.down()


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
