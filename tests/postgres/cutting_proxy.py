"""A TCP proxy in front of a real PostgreSQL that can cut a connection at a chosen moment.

It forwards bytes unchanged. When armed with a server reply tag (b"COMMIT", b"SELECT 1", …) it
drops the next server message carrying that tag and closes both sides: the server has done the
work, the client never hears about it. That is the "outcome of COMMIT unknown" case, made
deterministic without touching the server or the client library.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class CuttingProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._cut_on: bytes | None = None
        self._cut_all = False
        self.cuts = 0
        self._sockets: set[socket.socket] = set()
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    # --- control -----------------------------------------------------------------------------------

    def cut_next_reply(self, tag: bytes) -> None:
        """Drop the next server reply whose CommandComplete tag is `tag`, and the connection."""
        with self._lock:
            self._cut_on = tag + b"\x00"

    def refuse_all(self, on: bool = True) -> None:
        """Cut every connection at its first server reply (a server that is 'down')."""
        with self._lock:
            self._cut_all = on

    def close(self) -> None:
        self._stopped = True
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for s in list(self._sockets):
                with contextlib.suppress(OSError):
                    s.close()

    # --- plumbing ----------------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets |= {client, server}
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_server: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if from_server and self._should_cut(data):
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()
                with self._lock:
                    self._sockets.discard(s)

    def _should_cut(self, data: bytes) -> bool:
        with self._lock:
            if self._cut_all:
                self.cuts += 1
                return True
            # 'C' CommandComplete, int32 length, tag, NUL
            if self._cut_on is not None and b"C" in data and self._cut_on in data:
                self._cut_on = None
                self.cuts += 1
                return True
        return False
