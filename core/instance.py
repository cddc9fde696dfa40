"""Facts about this process: identity for the registry, resource usage for health reports."""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from typing import Any

import psutil

from core.constants import VERSION


def new_instance_id() -> str:
    """``<hostname>-<pid>-<8 hex>``: unique for every start, so a restart never inherits a dead identity."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


class ProcessFacts:
    """Process facts for health reports; psutil calls are cheap and never raise out of here."""

    def __init__(self) -> None:
        self.started_monotonic = time.monotonic()
        self.started_at = time.time()
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)  # prime: the next call reports usage since now
        self._lock = threading.Lock()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            try:
                mem = self._proc.memory_info()
                cpu = self._proc.cpu_percent(None)
                threads = self._proc.num_threads()
            except psutil.Error:  # pragma: no cover - process facts are best effort
                mem, cpu, threads = None, None, None
        return {
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "version": VERSION,
            "uptime_seconds": round(time.monotonic() - self.started_monotonic, 3),
            "rss_bytes": mem.rss if mem else None,
            "cpu_percent": cpu,
            "threads": threads,
        }
