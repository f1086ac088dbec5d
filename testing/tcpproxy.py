"""A TCP proxy the tests control: 127.0.0.1:PORT forwarded to a server's port, with faults.

    proxy = Proxy(server_port)      # clients connect to 127.0.0.1:proxy.port
    proxy.cut()                     # every open connection reset, new ones reset at once
    proxy.restore()                 # connections go through again
    proxy.silence()                 # new connections accepted but never answered
    proxy.drop_after_commit()       # the next COMMIT reaches the server, its answer is lost

Runs in threads of the test process; needs no privileges.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

# PostgreSQL's simple-query message for COMMIT, as psycopg sends it: 'Q', length, text, NUL.
COMMIT_QUERY = b"Q" + struct.pack(">I", 4 + len(b"COMMIT") + 1) + b"COMMIT\x00"


def _reset(sock: socket.socket) -> None:
    """Drop a connection: shut down (which also wakes a thread blocked reading it), then
    close without lingering (an RST for anything still unsent)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class _Pair:
    def __init__(self, client: socket.socket, server: socket.socket | None):
        self.client, self.server = client, server
        self.commit_sent = False   # armed: a COMMIT went to the server; drop what comes back
        self.closed = False


class Proxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self.mode = "forward"          # forward | cut | silent
        self._drop_commits = 0         # COMMIT answers still to drop
        self.dropped_commits = 0
        self._closing = False
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    # --- the faults ------------------------------------------------------------------

    def cut(self) -> None:
        """The path is cut: open connections are reset, new ones reset as they come."""
        with self._lock:
            self.mode = "cut"
            pairs = list(self._pairs)
        for pair in pairs:
            self._close(pair)

    def silence(self) -> None:
        """New connections are accepted and then get no answer at all (a server that hangs)."""
        with self._lock:
            self.mode = "silent"

    def restore(self) -> None:
        with self._lock:
            self.mode = "forward"

    def drop_after_commit(self, times: int = 1) -> None:
        """The next `times` COMMITs reach the server and commit; their answers are dropped
        and the connection reset, so the client cannot know the outcome."""
        with self._lock:
            self._drop_commits += times

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self._listener.close()
        for pair in list(self._pairs):
            self._close(pair)

    # --- forwarding --------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            mode = self.mode
            if mode == "cut":
                _reset(client)
                continue
            if mode == "silent":
                pair = _Pair(client, None)   # held open, never answered, until cut or close
                with self._lock:
                    self._pairs.add(pair)
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
                server.settimeout(None)
            except OSError:
                _reset(client)
                continue
            pair = _Pair(client, server)
            with self._lock:
                self._pairs.add(pair)
            threading.Thread(target=self._pump, args=(pair, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(pair, False), daemon=True).start()

    def _pump(self, pair: _Pair, upstream: bool) -> None:
        src, dst = (pair.client, pair.server) if upstream else (pair.server, pair.client)
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if upstream and COMMIT_QUERY in data:
                    with self._lock:
                        if self._drop_commits:
                            self._drop_commits -= 1
                            pair.commit_sent = True
                elif not upstream and pair.commit_sent:
                    # The server answered the COMMIT: it is committed. The client never hears.
                    self.dropped_commits += 1
                    break
                dst.sendall(data)
        except OSError:
            pass
        self._close(pair)

    def _close(self, pair: _Pair) -> None:
        with self._lock:
            if pair.closed:
                return
            pair.closed = True
            self._pairs.discard(pair)
        _reset(pair.client)
        if pair.server is not None:
            _reset(pair.server)
