"""This code's migrations, by name only: where they are and which revisions they are, without Alembic (a run
checks the database's revision at its start, core/runstore.py; Alembic itself is loaded only to migrate)."""

from __future__ import annotations

from pathlib import Path


def migrations_dir() -> Path:
    """The migrations folder: packaged inside ``core`` in a wheel, beside it in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_migrations", here.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError("migrations folder not found beside the core package")


def revisions() -> list[str]:
    """This code's migrations, oldest first (each file is named by its revision id, numbered in order)."""
    return sorted(p.stem for p in (migrations_dir() / "versions").glob("[0-9][0-9][0-9][0-9]_*.py"))


def needed_over(revision: str | None) -> str | None:
    """This code's latest revision when ``revision`` (a database's) is an older one of its own, else None: a
    database at the latest, at one this code does not know (a newer version migrated it: whether the previous
    version's processes may keep running is each migration's to say, README "Upgrading") or not migrated by
    Alembic at all."""
    known = revisions()
    return known[-1] if revision in known and revision != known[-1] else None
