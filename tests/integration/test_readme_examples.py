"""The README's examples, run as written: every code block of the sections named here, against a fresh
database (``DATABASE_URL``), Python blocks as a user's script in a process of its own, SQL blocks on one
connection."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any

import psycopg
import pytest

from tests.support import ROOT

SECTIONS = ("Enqueue in your transaction", "Queue control: schedules, pause and resume, rate limits",
            "Flows: steps released by their parents' completion", "Tracing")
_BLOCK = re.compile(r"^```(python|sql)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(section: str) -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 4)
    return [(m.group(1), m.group(2)) for m in _BLOCK.finditer(text[start:end if end > 0 else None])]


@pytest.mark.parametrize("section", SECTIONS)
def test_the_sections_examples_run(section: str, dsn: str, db: Any) -> None:
    found = blocks(section)
    assert found, f"no examples under {section!r}"
    for i, (language, code) in enumerate(found):
        if language == "python":
            result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "DATABASE_URL": dsn},
                                    capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, f"example {i} of {section!r}:\n{code}\n{result.stderr[-3000:]}"
        else:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(code)
    if section.startswith("Queue control"):
        assert [r[0] for r in db.execute("SELECT name FROM schedules").fetchall()] == ["nightly-export"]
        assert db.execute("SELECT count(*) FROM queue_state WHERE paused_at IS NOT NULL").fetchone()[0] == 0
        assert db.execute("SELECT pattern, n FROM key_rates").fetchall() == [("tenant-*", 10)]
    if section.startswith("Flows"):
        # one run, completed: 7 records (validate, charge, reserve, ship, 2 labels, pack)
        assert db.execute("SELECT status FROM flow_runs").fetchall() == [("completed",)]
        assert db.execute("SELECT status, count(*) FROM processing_queue GROUP BY 1").fetchall() == [("completed", 7)]
    if section == "Tracing":
        # the record completed, its trace context (the send span's) stored
        assert db.execute("SELECT status, trace_context LIKE '00-%' FROM processing_queue").fetchall() == [
            ("completed", True)]
    if section == "Enqueue in your transaction":
        # three orders, each with its record; the signup's record in queue 'welcome'
        assert db.execute("SELECT count(*) FROM orders").fetchone()[0] == 3
        assert db.execute("SELECT count(*) FROM processing_queue WHERE queue = 'default'").fetchone()[0] == 3
        assert db.execute("SELECT p.payload->>'email' FROM processing_queue JOIN record_payloads p USING (id)"
                          " WHERE queue = 'welcome'"
                          ).fetchone()[0] == "ada@example.com"
