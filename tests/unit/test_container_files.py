"""The container files say what the service promises (no Docker engine runs here to build them)."""

from __future__ import annotations

from tests.support import ROOT


def test_dockerfile_runs_as_non_root_with_healthcheck_and_entrypoint() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "USER dproc" in text and "useradd" in text
    assert 'HEALTHCHECK' in text and '"dproc", "health"' in text
    assert 'ENTRYPOINT ["dproc"]' in text and 'CMD ["run"]' in text


def test_compose_has_postgres_and_three_worker_replicas() -> None:
    text = (ROOT / "compose.yaml").read_text()
    assert "image: postgres" in text
    assert "replicas: 3" in text
    assert "DP_HANDLER: core.demo:log_payload" in text
    import core.demo

    assert callable(core.demo.log_payload)
