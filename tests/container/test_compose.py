"""compose.yaml as the compose tool reads it, and its migrate and worker services run against the test's
database (its own PostgreSQL service is an image from a registry, which the engine may not reach: an override
file points the services at the session's cluster instead, on the host's network)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from core import DistributedProcessor
from tests.container.conftest import create_database
from tests.container.engine import Engine, Figures, docker, wait_for
from tests.servers import Cluster
from tests.support import ROOT

pytestmark = pytest.mark.timeout(1800)

RECORDS = 2_000


def keda_query() -> str:
    scaled = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "scaledobject.yaml").read_text())
    return str(scaled["spec"]["triggers"][0]["metadata"]["query"])


def test_compose_config_migrate_and_three_workers(
    engine: Engine, image: str, cluster: Cluster, compose_cmd: list[str], figures: Figures, tmp_path: Path
) -> None:
    checked = subprocess.run([*compose_cmd, "-f", str(ROOT / "compose.yaml"), "config"], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    services = yaml.safe_load(checked.stdout)["services"]
    assert {"db", "migrate", "worker"} <= set(services)

    host_dsn = create_database(cluster, "compose")
    dsn = f"postgresql://postgres@127.0.0.1:{cluster.port}/compose"
    override = tmp_path / "compose.test.yaml"
    # The image the session built; the host's network (the cluster listens on 127.0.0.1); no HTTP port, which
    # three replicas on one network namespace would all claim.
    override.write_text(yaml.safe_dump({"services": {
        name: {"image": image, "network_mode": "host", "labels": {"io.dproc.test-run": engine.run_id},
               "environment": {"DATABASE_URL": dsn, **({"DP_HEALTH_PORT": ""} if name == "worker" else {})}}
        for name in ("migrate", "worker")
    }}))
    project = engine.name("compose")
    files = ["-f", str(ROOT / "compose.yaml"), "-f", str(override)]
    engine.compose_projects.append((files, project))

    def compose(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*compose_cmd, *files, "-p", project, *args], capture_output=True, text=True,
                                timeout=timeout)
        assert result.returncode == 0, f"compose {' '.join(args)}: {result.stdout[-1500:]}{result.stderr[-1500:]}"
        return result

    compose("run", "--rm", "-T", "--no-deps", "migrate")
    with DistributedProcessor(host_dsn) as p:
        p.add_records([{"n": n} for n in range(RECORDS)])
    with psycopg.connect(host_dsn, autocommit=True) as conn:
        # KEDA's query (deploy/kubernetes/scaledobject.yaml) sees the backlog, before any worker runs.
        assert one(conn, keda_query()) == RECORDS

        started = time.monotonic()
        compose("up", "--detach", "--no-deps", "--no-build", "worker")
        workers = docker("ps", "-q", "--filter", f"label=com.docker.compose.project={project}",
                         "--filter", "label=com.docker.compose.service=worker").stdout.split()
        assert len(workers) == 3, "deploy.replicas: 3"
        wait_for(lambda: one(conn, "SELECT count(*) FROM processing_queue WHERE status = 'completed'") == RECORDS,
                 120, f"{RECORDS} records completed by the compose workers")
        figures["compose_3_workers_2000_records_seconds"] = round(time.monotonic() - started, 1)
        assert one(conn, keda_query()) == 0
        # The first replica up may drain everything before the last one has registered.
        wait_for(lambda: one(conn, "SELECT count(*) FROM processor_instances WHERE status = 'running'") == 3,
                 60, "3 compose workers registered")

        compose("stop")  # stop_grace_period: 40s
        for container in workers:
            state = json.loads(docker("inspect", container).stdout)[0]["State"]
            assert state["Status"] == "exited" and state["ExitCode"] == 0, state
        assert one(conn, "SELECT count(*) FROM processor_instances WHERE status = 'stopped'") == 3


def one(conn: psycopg.Connection[Any], query: str) -> Any:
    row = conn.execute(query.encode()).fetchone()
    assert row is not None
    return row[0]
