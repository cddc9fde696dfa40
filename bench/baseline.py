"""Another version of the code beside this one, for a benchmark's baseline "the code before": a git worktree
of ``ref`` in a temporary folder, whose workers (``python -m bench.workers`` run in it) import its ``core``."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def worktree(ref: str) -> Path:
    """A checkout of ``ref`` (made once per commit, reused)."""
    sha = subprocess.run(["git", "rev-parse", "--short=12", ref], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    path = Path(tempfile.gettempdir()) / f"dp-baseline-{sha}"
    if not (path / "core").is_dir():
        if path.exists():
            shutil.rmtree(path)
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, check=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(path), sha], cwd=ROOT, check=True,
                       capture_output=True)
    return path


# Run by the other version's Python in its checkout (``python -c``: its folder comes first on sys.path), so its
# own ``core`` migrates and fills: the same fill as Bench.fill_pending without keys.
_MIGRATE = "import sys\nfrom core.migrate import upgrade\nupgrade(sys.argv[1])\n"
_FILL = """
import sys
import psycopg
from core import DistributedProcessor
dsn, n = sys.argv[1], int(sys.argv[2])
with psycopg.connect(dsn, autocommit=True) as conn:
    conn.execute("TRUNCATE processing_queue; TRUNCATE queue_stats; TRUNCATE processor_instances")
with DistributedProcessor(dsn) as p:
    for start in range(0, n, 10_000):
        p.add_records([{"n": g} for g in range(start + 1, min(n, start + 10_000) + 1)])
with psycopg.connect(dsn, autocommit=True) as conn:
    conn.execute("VACUUM ANALYZE processing_queue")
"""


class OwnDatabase:
    """A database of its own for the code checked out at ``path``, migrated and filled by that code.

    The code before a change has to run on the schema it was written for: on this code's schema it reads what
    it never wrote (since migration 0018 a batch's payloads are kept apart, and an older claim returns the row's
    NULL payload instead of reading it, doing less work than it did when it was current)."""

    def __init__(self, bench: Any, path: Path, tag: str) -> None:
        self.bench, self.path = bench, path
        self.dsn = bench.extra_database(f"{bench.dbname}_{tag}")
        subprocess.run([sys.executable, "-c", _MIGRATE, self.dsn], cwd=path, check=True)

    def fill_pending(self, n: int) -> None:
        """``n`` pending records of ``{"n": i}``, added by that code's ``add_records`` in batches of 10,000."""
        subprocess.run([sys.executable, "-c", _FILL, self.dsn, str(n)], cwd=self.path, check=True)
        self.bench.settle()

    def drain(self, workers: int, batch: int) -> float:
        """Records/s of ``workers`` processes of that code draining its database."""
        return float(self.bench.drain_procs("ours", workers, batch, dsn=self.dsn, cwd=self.path)["rate"])
