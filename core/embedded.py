"""An embedded PostgreSQL (pgserver) for machines with no server: the CLI default and the test fallback."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger("core.embedded")

_servers: dict[str, Any] = {}


def default_data_dir() -> Path:
    """Project-local data folder, reused on the next start (``DP_EMBEDDED_DIR`` overrides it)."""
    return Path(os.environ.get("DP_EMBEDDED_DIR") or Path.cwd() / ".dproc" / "pgdata").resolve()


def start(data_dir: Path | str | None = None, *, keep_running: bool = False) -> str:
    """Start (or join) the embedded server in ``data_dir`` and return a DSN for its ``postgres`` database.

    Several processes may call this for the same folder: they share one server, which stops when the last of
    them exits (unless ``keep_running``).
    """
    # platformdirs (used by pgserver) warns about XDG_RUNTIME_DIR in containers; it is harmless here.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    try:
        import pgserver  # type: ignore[attr-defined,unused-ignore]
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "no DATABASE_URL is set and the embedded PostgreSQL is not installed: "
            "pip install 'distributed-processor[embedded]' or set DATABASE_URL"
        ) from exc
    path = Path(data_dir) if data_dir else default_data_dir()
    path.mkdir(parents=True, exist_ok=True)
    key = str(path)
    server = _servers.get(key)
    if server is None:
        server = pgserver.get_server(  # type: ignore[attr-defined,unused-ignore]
            path, cleanup_mode=None if keep_running else "stop")
        _servers[key] = server
        log.info("embedded PostgreSQL running", extra={"data_dir": key})
    return str(server.get_uri())
