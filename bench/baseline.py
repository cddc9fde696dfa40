"""Another version of the code beside this one, for a benchmark's baseline "the code before": a git worktree
of ``ref`` in a temporary folder, whose workers (``python -m bench.workers`` run in it) import its ``core``."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

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
