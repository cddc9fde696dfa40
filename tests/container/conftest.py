"""Fixtures of the container category: the engine (skipped only where none can run, never under CI), the base
image, the project's image, a PostgreSQL cluster of the session's own, and the figures the run measured."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.container.engine import (
    REGISTRY_BASE,
    DockerError,
    Engine,
    Figures,
    debian_base_tag,
    docker,
    engine_problem,
    image_exists,
    inspect,
    make_debian_base,
    remove_stale_bases,
)
from tests.servers import Cluster

FIGURES = Figures()
STARTED = time.monotonic()


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    problem = engine_problem()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and the container tests cannot run: {problem}", pytrace=False)
        pytest.skip(f"no Docker engine can run here: {problem}")
    eng = Engine()
    FIGURES["engine"] = docker("version", "--format", "{{.Server.Version}}", timeout=30).stdout.strip()
    yield eng
    problems = eng.cleanup()
    assert not problems, f"left behind by the container tests: {problems}"


@pytest.fixture(scope="session")
def figures() -> Figures:
    return FIGURES


@pytest.fixture(scope="session")
def base_image(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> str:
    """``DP_TEST_PYTHON_IMAGE``, else the Dockerfile's default if the engine has it or can pull it, else an
    image made from Debian's packages (kept in the engine for the next run, under a tag naming its recipe)."""
    chosen = os.environ.get("DP_TEST_PYTHON_IMAGE")
    if chosen:
        if not image_exists(chosen):
            docker("pull", chosen, timeout=600)
        FIGURES["base_image"] = chosen
        return chosen
    if image_exists(REGISTRY_BASE) or docker("pull", REGISTRY_BASE, check=False, timeout=300).returncode == 0:
        FIGURES["base_image"] = REGISTRY_BASE
        return REGISTRY_BASE
    tag = debian_base_tag()
    if image_exists(tag):
        FIGURES["base_image"] = f"{tag} (made from Debian's packages by an earlier run, reused)"
    else:
        started = time.monotonic()
        make_debian_base(tag, tmp_path_factory.mktemp("base") / "debootstrap.log")
        FIGURES["base_image"] = f"{tag} (made from Debian's packages now)"
        FIGURES["base_build_seconds"] = round(time.monotonic() - started, 1)
    stale = remove_stale_bases(tag)
    if stale:
        FIGURES["stale_bases_removed"] = stale
    FIGURES["base_size_mb"] = round(inspect("image", tag)["Size"] / 1e6, 1)
    return tag


@pytest.fixture(scope="session")
def image(engine: Engine, base_image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The project's image, built from the checkout (a throwaway tag, removed at the end of the session)."""
    context = engine.snapshot(tmp_path_factory.mktemp("context"))
    # The build stage gets a throwaway tag of its own (the second build reuses it from the cache): the legacy
    # builder would leave it behind untagged.
    stage = engine.throwaway_tag("build-stage")
    tag = engine.throwaway_tag("image")
    seconds = engine.build(context, base_image, stage, "--target", "build")
    seconds += engine.build(context, base_image, tag)
    info = inspect("image", tag)
    FIGURES["image_build_seconds"] = round(seconds, 1)
    FIGURES["image_size_mb"] = round(info["Size"] / 1e6, 1)
    base_size = inspect("image", base_image)["Size"]
    FIGURES["image_added_to_base_mb"] = round((info["Size"] - base_size) / 1e6, 1)
    return tag


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """A PostgreSQL of the session's own, on 127.0.0.1 (the containers share the host's network)."""
    pg = Cluster("container", settings={"max_connections": "200"})
    try:
        pg.start()
        yield pg
    finally:
        pg.destroy()


@pytest.fixture(scope="session")
def compose_cmd(engine: Engine) -> list[str]:
    """The compose tool: Docker's plugin where installed, else Debian's docker-compose."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0:
        engine.compose = ["docker", "compose"]
    elif shutil.which("docker-compose"):
        engine.compose = ["docker-compose"]
    else:
        raise DockerError("no compose tool: neither `docker compose` nor docker-compose (apt-get install "
                          "docker-compose)")
    return engine.compose


def create_database(cluster: Cluster, name: str) -> str:
    """A fresh database on the session's cluster; its DSN for the host (psycopg, no password)."""
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"'.encode())
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    return cluster.dsn(name)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES.values:
        return
    FIGURES["session_seconds"] = round(time.monotonic() - STARTED, 1)
    FIGURES["cpus"] = os.cpu_count()
    FIGURES["date"] = datetime.date.today().isoformat()
    terminalreporter.section("container figures")
    for line in FIGURES.lines():
        terminalreporter.write_line(line)
    target = os.environ.get("DP_CONTAINER_RESULTS")
    if target:
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(FIGURES.values, indent=2) + "\n")
        terminalreporter.write_line(f"  written to {path}")
