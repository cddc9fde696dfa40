"""The CLI as users run it: a real subprocess per call, happy path and bad input for every subcommand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from core import DistributedProcessor
from tests.support import run_cli

BAD_DSN = "postgresql://nobody:hunter2@127.0.0.1:1/nowhere?connect_timeout=2"
FAST_FAIL = {"DP_CONNECT_TIMEOUT": "3"}


def cli(dsn: str | None, *args: str, input: str | None = None, timeout: float = 120,
        extra_env: dict[str, str] | None = None) -> Any:
    env = {"DATABASE_URL": dsn} if dsn else {}
    env.update(extra_env or {})
    result = run_cli(*args, env=env, input=input, timeout=timeout)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_help_names_the_environment_variable_of_every_option() -> None:
    result = cli(None, "run", "--help")
    assert result.returncode == 0
    for env in ("DP_HANDLER", "DP_QUEUE", "DP_BATCH_SIZE", "DP_CONCURRENCY", "DP_HEALTH_PORT", "DP_POLL_ONLY"):
        assert f"env {env}" in result.stdout
    assert "DATABASE_URL" in cli(None, "--help").stdout


def test_unknown_option_is_a_usage_error() -> None:
    result = cli(None, "run", "--no-such-option")
    assert result.returncode == 2
    assert "unrecognized arguments: --no-such-option" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_dsn_gives_one_line_and_no_password(tmp_path: Path) -> None:
    for args in (["migrate"], ["status"], ["cleanup"], ["purge"], ["retry-failed"]):
        result = cli(BAD_DSN, *args, timeout=60, extra_env=FAST_FAIL)
        assert result.returncode == 1, args
        assert result.stderr.startswith("dproc: error:"), result.stderr
        assert "hunter2" not in result.stderr + result.stdout
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    malformed = cli("host=x bogus_option=1", "status")
    assert malformed.returncode == 1 and "malformed DSN" in malformed.stderr


def test_health_exit_codes(dsn: str, empty_dsn: str) -> None:
    ok = cli(dsn, "health")
    assert ok.returncode == 0 and ok.stdout.startswith("healthy")
    report = json.loads(cli(dsn, "health", "--json").stdout)
    assert report["status"] == "healthy" and report["database"]["migrated"] is True
    down = cli(BAD_DSN, "health", "--timeout", "2")
    assert down.returncode == 1 and down.stdout.startswith("unhealthy")
    assert "hunter2" not in down.stdout
    unmigrated = cli(empty_dsn, "health")
    assert unmigrated.returncode == 1 and "not migrated" in unmigrated.stdout


def test_enqueue_from_file_and_stdin_then_status(dsn: str, tmp_path: Path, db: Any) -> None:
    lines = tmp_path / "records.jsonl"
    lines.write_text("\n".join(json.dumps({"n": i}) for i in range(250)) + "\n\n")
    result = cli(dsn, "enqueue", str(lines), "--queue", "jobs", "--batch", "100")
    assert result.returncode == 0, result.stderr
    assert "enqueued 250 records into queue 'jobs'" in result.stdout
    result = cli(dsn, "enqueue", "--queue", "other", input='{"a": 1}\n{"a": 2}\n')
    assert result.returncode == 0, result.stderr
    payloads = [r[0]["n"] for r in db.execute("SELECT p.payload FROM processing_queue JOIN record_payloads p USING (id)"
                                              " WHERE queue = 'jobs' ORDER BY id")]
    assert payloads == list(range(250))
    status = cli(dsn, "status")
    assert status.returncode == 0
    assert "jobs" in status.stdout and "250" in status.stdout
    data = json.loads(cli(dsn, "status", "--json").stdout)
    assert data["queues"]["jobs"]["pending"] == 250 and data["queues"]["other"]["pending"] == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [('{"ok": 1}\n{"broken": \n{"ok": 3}\n', "line 2: malformed JSON"), ('{"ok": 1}\n[1, 2]\n', "line 2: expected")],
)
def test_enqueue_bad_line_names_its_number_and_writes_nothing(dsn: str, db: Any, content: str, message: str) -> None:
    result = cli(dsn, "enqueue", input=content)
    assert result.returncode == 1
    assert message in result.stderr
    assert db.execute("SELECT count(*) FROM processing_queue").fetchone()[0] == 0


def test_enqueue_missing_file(dsn: str) -> None:
    result = cli(dsn, "enqueue", "/no/such/file.jsonl")
    assert result.returncode == 1 and "cannot read /no/such/file.jsonl" in result.stderr


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        ("tests.procs.handlers", "must look like package.module:function"),
        ("no_such_module_xyz:run", "cannot import handler module 'no_such_module_xyz'"),
        ("tests.procs.handlers:missing", "has no attribute 'missing'"),
        ("tests.procs.handlers:not_callable", "is not callable"),
    ],
)
def test_run_with_a_bad_handler_path(dsn: str, handler: str, message: str) -> None:
    result = cli(dsn, "run", "--handler", handler)
    assert result.returncode == 1
    assert message in result.stderr


def test_run_drains_and_exits_zero(dsn: str, db: Any) -> None:
    with DistributedProcessor(dsn) as p:
        p.add_records([{"n": i} for i in range(300)])
    result = cli(dsn, "run", "--handler", "tests.procs.handlers:noop", "--stop-when-empty", "--poll-interval", "0.1")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["processed"] == 300
    assert db.execute("SELECT count(*) FROM processing_queue WHERE status = 'completed'").fetchone()[0] == 300
    row = db.execute("SELECT status FROM processor_instances").fetchall()
    assert row == [("stopped",)]


def test_run_with_json_logs_redacts_the_dsn(dsn: str) -> None:
    secret_dsn = dsn + " password=sekrit-value"
    result = cli(secret_dsn, "--log-format", "json", "run", "--handler", "tests.procs.handlers:noop",
                 "--stop-when-empty", "--poll-interval", "0.1")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.strip().splitlines()]
    assert any(line["msg"] == "worker starting" for line in lines)
    assert "sekrit-value" not in result.stderr + result.stdout


def test_cleanup_purge_and_retry_failed(dsn: str, db: Any) -> None:
    with DistributedProcessor(dsn, max_attempts=1) as p:
        p.add_records([{"n": i} for i in range(4)])
        recs = p.claim_records(4)
        p.mark_failed(recs[:2], "boom: disk full")
        p.mark_completed(recs[2:3])
    db.execute("UPDATE processing_queue SET lease_expires_at = now() - interval '1 second' WHERE status = 'processing'")
    assert "recovered 1 orphaned records" in cli(dsn, "cleanup").stdout
    result = cli(dsn, "retry-failed", "--error-pattern", "disk full")
    assert result.returncode == 0 and "moved 2 failed records" in result.stdout
    # the orphan had used its only attempt, so recovery failed it: 1 completed + 1 failed are finished
    result = cli(dsn, "purge", "--older-than", "0s")
    assert result.returncode == 0 and "purged 2 finished records" in result.stdout
    assert cli(dsn, "purge", "--older-than", "soon").returncode == 2


def test_embedded_database_is_used_when_no_dsn_is_set(tmp_path: Path) -> None:
    env = {"DATABASE_URL": "", "DP_EMBEDDED_DIR": str(tmp_path / "pg")}
    result = run_cli("migrate", env=env, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "embedded PostgreSQL" in result.stderr
    result = run_cli("status", env=env, timeout=180)  # the data folder is reused
    assert result.returncode == 0, result.stderr


def test_an_embedded_data_folder_of_another_major_is_reported_not_crashed_on(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from core.embedded import embedded_major
    from tests.support import ROOT

    old = tmp_path / "pgdata"
    old.mkdir()
    (old / "PG_VERSION").write_text("16\n")  # what the pgserver-based versions left in ./.dproc/pgdata
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["DP_EMBEDDED_DIR"] = str(old)
    result = subprocess.run([sys.executable, "-m", "core", "demo"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"holds a PostgreSQL 16 cluster, but the embedded server is PostgreSQL {embedded_major()}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in old.iterdir()) == ["PG_VERSION"], "nothing was started or written there"
