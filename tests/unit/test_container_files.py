"""The container files say what the service promises (the container category builds and runs them)."""

from __future__ import annotations

import re

import pytest
import yaml

from core.checks import parse_duration
from tests.support import ROOT
from tests.unit.test_deploy_manifests import cli_variables, dockerfile_uid, run_args


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_dockerfile_takes_its_base_as_a_build_argument_and_builds_in_two_stages() -> None:
    steps = instructions()
    assert steps[0][0] == "ARG" and re.fullmatch(r"PYTHON_IMAGE=python:3\.\d+-slim", steps[0][1])
    froms = [arg for op, arg in steps if op == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]
    runtime = steps[[i for i, (op, _) in enumerate(steps) if op == "FROM"][-1]:]
    # The runtime stage takes the installed virtualenv and nothing else of the build.
    assert [arg for op, arg in runtime if op == "COPY"] == ["--from=build /opt/dproc /opt/dproc"]
    assert not any(op == "RUN" and "pip" in arg for op, arg in runtime)


def test_dockerfile_runs_as_non_root_with_healthcheck_signal_and_entrypoint() -> None:
    steps = dict(reversed(instructions()))  # the first of each kind
    uid = dockerfile_uid()
    assert uid != 0 and steps["USER"] == f"{uid}:{uid}"
    assert '"dproc", "health"' in steps["HEALTHCHECK"]
    assert steps["STOPSIGNAL"] == "SIGTERM"
    assert steps["ENTRYPOINT"] == '["dproc"]' and steps["CMD"] == '["run"]'
    assert "DP_HEALTH_PORT=8080" in (ROOT / "Dockerfile").read_text() and steps["EXPOSE"] == "8080"


def test_dockerignore_lets_through_what_the_build_copies() -> None:
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    copied = {src.rstrip("/") for op, arg in instructions() if op == "COPY" and "--from" not in arg
              for src in arg.split()[:-1]}
    assert copied == allowed


def compose() -> dict[str, dict[str, dict[str, object]]]:
    loaded: dict[str, dict[str, dict[str, object]]] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded


def test_compose_has_postgres_migrate_and_three_worker_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose()["services"]
    assert str(services["db"]["image"]).startswith("postgres:")
    assert services["migrate"]["command"] == ["migrate"] and services["worker"]["command"] == ["run"]
    worker = services["worker"]
    assert worker["deploy"] == {"replicas": 3}
    env: dict[str, str] = worker["environment"]  # type: ignore[assignment]
    assert set(env) <= cli_variables()
    args = run_args([{"name": k, "value": v} for k, v in env.items()], monkeypatch)
    assert parse_duration(str(worker["stop_grace_period"])) > args.grace_seconds
    assert env["DP_HANDLER"] == "core.demo:log_payload"
    import core.demo

    assert callable(core.demo.log_payload)
