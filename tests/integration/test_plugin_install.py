"""The pytest plugin as a user gets it: a test file of their own, in a folder of their own (no conftest), run
by pytest from the installed package; its fixtures come through the ``pytest11`` entry point alone."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support import Server

USER_TESTS = textwrap.dedent('''
    import pytest

    from core import RetryPolicy
    from core.testing import InMemoryProcessor, drain


    def test_memory_with_its_clock(dp_memory, dp_clock):
        assert isinstance(dp_memory, InMemoryProcessor) and dp_memory.clock is dp_clock
        (rid,) = dp_memory.add_records([{"n": 1}], delay=30)
        assert dp_memory.claim_records() == []
        dp_clock.advance(30)
        (rec,) = dp_memory.claim_records()
        assert rec.id == rid and dp_memory.mark_completed([rec]) == 1


    @pytest.mark.dp_options(retry=RetryPolicy(base_delay=60, jitter=0), max_attempts=2)
    def test_memory_drain_moves_the_clock(dp_memory):
        (rid,) = dp_memory.add_records([{}])
        out = drain(dp_memory, lambda r: 1 / (r.attempts - 1))
        assert out.retries == {rid: 1} and out.completed == [rid]


    @pytest.mark.dp_options(max_attempts=1)
    def test_postgres(dp_postgres, dp_dsn):
        assert dp_postgres.max_attempts == 1 and dp_postgres.dsn == dp_dsn
        ids = dp_postgres.add_records([{"n": 1}, {"n": 2}])
        out = drain(dp_postgres, lambda r: None)
        assert out.completed == list(ids)
        assert dp_postgres.health_check()["database"]["migrated"] is True


    # The README's two examples ("Testing your handlers"), as written there.
    def send_invoice(record):
        if record.payload["amount"] < 0:
            raise ValueError("a negative amount")


    @pytest.mark.dp_options(retry=RetryPolicy(base_delay=30, jitter=0), max_attempts=3)
    def test_bad_invoices_fail_after_three_tries(dp_memory):
        good, bad = dp_memory.add_records([{"amount": 10}, {"amount": -1}])
        out = drain(dp_memory, send_invoice)          # moves the fake clock past the 30 s and 60 s backoffs
        assert out.completed == [good] and out.retries == {bad: 2}
        assert isinstance(out.failed[bad], ValueError)
        assert dp_memory.get_queue_status()["totals"]["failed"] == 1


    def test_invoices_complete_in_order(dp_postgres):
        ids = dp_postgres.add_records([{"amount": 1}, {"amount": 2}], ordering_key="acct-7")
        out = drain(dp_postgres, send_invoice)
        assert out.completed == list(ids)             # per-key order kept
        assert dp_postgres.health_check()["status"] == "healthy"
''')


def _run_user_tests(folder: Path, env: dict[str, str], *args: str) -> tuple[int, str, int]:
    """Run pytest on the user's file in ``folder``; returns (exit code, output, the pytest process's pid)."""
    (folder / "test_user.py").write_text(USER_TESTS)
    # Whatever this run was given to find plugins or a server, the user's run starts without it.
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "PYTEST_PLUGINS",
                                                            "PYTEST_ADDOPTS", "DATABASE_URL")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", *args, "test_user.py"],
        cwd=folder, env={**clean, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        output, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    return proc.returncode, output, proc.pid


def test_a_users_test_file_gets_both_fixtures_from_the_installed_plugin(tmp_path: Path, pg_server: Server) -> None:
    code, output, pid = _run_user_tests(tmp_path, {"DATABASE_URL": pg_server.admin_dsn})
    assert code == 0, output
    assert "5 passed" in output
    plugins = next(line for line in output.splitlines() if line.startswith("plugins:"))
    assert "distributed-processor" in plugins  # loaded as an installed plugin, not from a conftest
    assert list(tmp_path.glob("conftest.py")) == []
    # Every database the run made (its template, the test's copy; named after its pid) was dropped.
    with pg_server.admin() as conn:
        left = conn.execute("SELECT datname FROM pg_database WHERE datname ~ %s", (f"^dp_(tpl|t)_{pid}_",))
        assert left.fetchall() == []


def test_dp_memory_needs_no_database(tmp_path: Path) -> None:
    # Nothing listens on port 1 and the local server is ruled out: a dp_memory test must not care.
    code, output, _ = _run_user_tests(tmp_path, {"DATABASE_URL": "host=127.0.0.1 port=1 dbname=x user=x",
                                                 "DP_TEST_EMBEDDED": "1",
                                                 "DP_TEST_EMBEDDED_DIR": str(tmp_path / "none")},
                                      "-k", "memory or bad_invoices")
    assert code == 0, output
    assert "3 passed, 2 deselected" in output
    assert not (tmp_path / "none").exists()  # no embedded server was started either
