"""deploy/kubernetes agrees with the CLI and the image: every variable is one the CLI reads and parses, the
probes hit the worker's own paths on its port, the grace outlasts the drain, KEDA scales the Deployment on
its queue with the query the README names."""

from __future__ import annotations

import argparse
import re
from typing import Any

import pytest
import yaml

from core.cli import build_parser
from tests.support import ROOT

K8S = ROOT / "deploy" / "kubernetes"


def cli_variables() -> set[str]:
    """Every environment variable the CLI reads: each option names its own in its help, ``(env NAME``."""
    names: set[str] = set()
    parsers = [build_parser()]
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            names.update(re.findall(r"\(env (\w+)", action.help or ""))
            if isinstance(action, argparse._SubParsersAction):  # the commands, and `shards`' actions
                parsers.extend(action.choices.values())
    return names


def manifests() -> dict[str, list[dict[str, Any]]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(K8S.glob("*.yaml"))}


def by_kind(kind: str) -> dict[str, Any]:
    found = [d for docs in manifests().values() for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"one {kind} expected, found {len(found)}"
    return found[0]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def run_args(env: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, command: str = "run") -> Any:
    """The CLI's arguments for ``command`` under the manifest's literal environment (secrets stand in)."""
    for name in cli_variables():
        monkeypatch.delenv(name, raising=False)
    for item in env:
        monkeypatch.setenv(item["name"], str(item.get("value", "postgresql://from-a-secret@db/app")))
    return build_parser().parse_args([command])


def dockerfile_uid() -> int:
    match = re.search(r"useradd --uid (\d+)", (ROOT / "Dockerfile").read_text())
    assert match
    return int(match.group(1))


def test_every_manifest_loads_and_the_kustomization_lists_them() -> None:
    docs = manifests()
    assert {"deployment.yaml", "pdb.yaml", "scaledobject.yaml", "job-migrate.yaml", "kustomization.yaml",
            "secret.example.yaml"} <= set(docs)
    for name, items in docs.items():
        assert items and all("apiVersion" in d and "kind" in d for d in items), name
    kustomization = docs["kustomization.yaml"][0]
    assert set(kustomization["resources"]) == set(docs) - {"kustomization.yaml", "secret.example.yaml"}


def test_deployment_environment_is_the_clis(monkeypatch: pytest.MonkeyPatch) -> None:
    known = cli_variables()
    assert {"DATABASE_URL", "DP_HANDLER", "DP_GRACE_SECONDS", "DP_HEALTH_PORT"} <= known  # the scan works
    for workload in (by_kind("Deployment"), by_kind("Job")):
        env = container(workload)["env"]
        unknown = {item["name"] for item in env} - known
        assert not unknown, f"{workload['metadata']['name']}: variables the CLI does not read: {unknown}"
        secret = next(item for item in env if item["name"] == "DATABASE_URL")["valueFrom"]["secretKeyRef"]
        assert secret == {"name": by_kind("Secret")["metadata"]["name"], "key": "DATABASE_URL"}
    args = run_args(container(by_kind("Deployment"))["env"], monkeypatch)  # every value parses
    assert args.handler and args.command == "run"
    assert container(by_kind("Job"))["args"] == ["migrate"]
    assert container(by_kind("Deployment"))["args"] == ["run"]


def test_probes_port_and_grace_agree_with_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    deployment = by_kind("Deployment")
    spec = deployment["spec"]["template"]["spec"]
    worker = container(deployment)
    args = run_args(worker["env"], monkeypatch)
    (port,) = worker["ports"]
    assert port["containerPort"] == args.health_port
    # The image serves on the same port when DP_HEALTH_PORT is not set at all.
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"DP_HEALTH_PORT={args.health_port}" in dockerfile and f"EXPOSE {args.health_port}" in dockerfile
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == args.health_port
    http_source = (ROOT / "core" / "http.py").read_text()
    for probe, path in (("livenessProbe", "/health/live"), ("readinessProbe", "/health/ready"),
                        ("startupProbe", "/health/live")):
        get = worker[probe]["httpGet"]
        assert get["path"] == path and f'path == "{path}"' in http_source
        assert get["port"] in (port["containerPort"], port.get("name"))
    assert annotations["prometheus.io/path"] == "/metrics" and 'path == "/metrics"' in http_source
    # SIGTERM drains for grace_seconds (run()'s default unless DP_GRACE_SECONDS says otherwise); the kubelet's
    # SIGKILL must not cut that short.
    assert spec["terminationGracePeriodSeconds"] > args.grace_seconds
    resources = worker["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]


def test_pods_run_as_the_images_user() -> None:
    uid = dockerfile_uid()
    assert f"USER {uid}:{uid}" in (ROOT / "Dockerfile").read_text()
    for workload in (by_kind("Deployment"), by_kind("Job")):
        security = workload["spec"]["template"]["spec"]["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == uid == security["runAsGroup"]
        assert container(workload)["image"] == container(by_kind("Deployment"))["image"]


def test_disruption_budget_selects_the_workers() -> None:
    deployment, pdb = by_kind("Deployment"), by_kind("PodDisruptionBudget")
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert pdb["spec"]["maxUnavailable"] == 1


def keda_query() -> str:
    (trigger,) = by_kind("ScaledObject")["spec"]["triggers"]
    return str(trigger["metadata"]["query"])


def test_keda_scales_the_deployment_on_its_queues_due_records(monkeypatch: pytest.MonkeyPatch) -> None:
    scaled, deployment = by_kind("ScaledObject"), by_kind("Deployment")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert scaled["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "postgresql"
    meta = trigger["metadata"]
    worker = container(deployment)
    assert meta["connectionFromEnv"] in {item["name"] for item in worker["env"]}
    assert float(meta["targetQueryValue"]) > 0 and float(meta["activationTargetQueryValue"]) >= 0
    args = run_args(worker["env"], monkeypatch)
    query = keda_query()
    assert f"queue = '{args.queue}'" in query and "status = 'pending'" in query
    # The worker's schema is the connection's default one: the query names the table unqualified.
    assert args.schema == "public" and "FROM processing_queue" in query
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]


def test_the_readme_names_the_scalers_query() -> None:
    assert keda_query() in (ROOT / "README.md").read_text()
