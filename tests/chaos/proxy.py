"""A TCP proxy between workers and PostgreSQL that can blackhole traffic, or make it slow and lossy.

While blackholed, bytes are held back in both directions and nothing is closed: each side sees a silent
peer, as during a network partition. When traffic flows again the held bytes are delivered, as TCP
retransmission would, so both ends resume where they stopped.

With ``delay`` every chunk reaches the other side that many seconds late, each way; with ``hold_fraction`` a
random share of the chunks is held ``hold`` seconds longer, as a lost segment waits for its retransmission
(later bytes of that direction wait behind it: TCP delivers in order).
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections import deque
from typing import Any


class BlackholeProxy:
    def __init__(self, upstream: tuple[str, int] | str, *, delay: float = 0.0, hold_fraction: float = 0.0,
                 hold: float = 0.0, seed: int = 7) -> None:
        self.upstream = upstream
        self.delay = delay
        self.hold_fraction = hold_fraction
        self.hold = hold
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.flowing = threading.Event()
        self.flowing.set()
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self.chunks = 0  # test signals: how much went through, how much was held back
        self.held = 0

    def __enter__(self) -> BlackholeProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self.flowing.set()
        self.listener.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()

    def blackhole(self) -> None:
        self.flowing.clear()

    def restore(self) -> None:
        self.flowing.set()

    def cut_all(self) -> None:
        """Reset every connection now (as a router reboot would); new ones are accepted as before."""
        for s in list(self._sockets):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _connect_upstream(self) -> socket.socket:
        if isinstance(self.upstream, str):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(self.upstream)
            return s
        return socket.create_connection(self.upstream)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = self._connect_upstream()
            except OSError:
                client.close()
                continue
            self._sockets += [client, server]
            for src, dst in ((client, server), (server, client)):
                if self.delay or self.hold_fraction:
                    line: deque[tuple[float, bytes]] = deque()
                    ready = threading.Condition()
                    threading.Thread(target=self._read_slow, args=(src, dst, line, ready), daemon=True).start()
                    threading.Thread(target=self._send_slow, args=(dst, line, ready), daemon=True).start()
                else:
                    threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                self.flowing.wait()  # hold the bytes while blackholed
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._close(src, dst)

    def _read_slow(self, src: socket.socket, dst: socket.socket, line: deque[tuple[float, bytes]],
                   ready: threading.Condition) -> None:
        due_last = 0.0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._rng_lock:
                    held = self._rng.random() < self.hold_fraction
                due = time.monotonic() + self.delay + (self.hold if held else 0.0)
                due_last = max(due_last, due)  # in order: nothing overtakes a held chunk
                with ready:
                    self.chunks += 1
                    self.held += held
                    line.append((due_last, data))
                    ready.notify()
        except OSError:
            pass
        finally:
            with ready:
                line.append((due_last, b""))  # end of stream, after what is still on its way
                ready.notify()

    def _send_slow(self, dst: socket.socket, line: deque[tuple[float, bytes]], ready: threading.Condition) -> None:
        try:
            while True:
                with ready:
                    while not line:
                        ready.wait(0.5)
                    due, data = line.popleft()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)  # the link's latency itself
                if not data:
                    break
                self.flowing.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_RDWR)

    @staticmethod
    def _close(src: socket.socket, dst: socket.socket) -> None:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
