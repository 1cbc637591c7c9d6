"""TCP relays for tests: one a test can cut and heal (a broken link), and one that also keeps
every byte it forwards (what an eavesdropper on the wire would see)."""

from __future__ import annotations

import socket
import threading


class TcpRelay:
    """Forwards 127.0.0.1:port to 127.0.0.1:target (both directions); cut() drops every
    connection and refuses new ones at once until heal()."""

    record = False

    def __init__(self, port: int, target: int) -> None:
        self.port, self.target = port, target
        self._data = bytearray()
        self._lock = threading.Lock()
        self._cut = threading.Event()
        self._closed = threading.Event()
        self._conns: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", port))
        self._listener.settimeout(0.1)
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def captured(self) -> bytes:
        with self._lock:
            return bytes(self._data)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:  # the 0.1 s accept timeout, or the listener closed
                continue
            if self._cut.is_set():
                conn.close()
                continue
            try:
                up = socket.create_connection(("127.0.0.1", self.target), timeout=1)
            except OSError:
                conn.close()
                continue
            up.settimeout(None)
            with self._lock:
                self._conns += [conn, up]
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pump, args=(a, b), name="relay-pump", daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._cut.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if self.record:
                    with self._lock:
                        self._data += data
                dst.sendall(data)
        except OSError:
            pass  # the other side went away: close both
        for s in (src, dst):
            try:
                s.close()
            except OSError:
                pass

    def cut(self) -> None:
        """Drops every connection; new ones are refused until heal()."""
        self._cut.set()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def heal(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self._listener.close()


class RecordingRelay(TcpRelay):
    """A TcpRelay that keeps every byte it forwards (`captured()`)."""

    record = True
