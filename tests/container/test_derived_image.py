"""Your handlers in an image of your own: the recipe of docs/containers.md, built on the project's image and run
against a database (the image's virtualenv has no pip; ensurepip lends it one for the install)."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from core import DistributedProcessor
from tests.container.conftest import create_database
from tests.container.engine import Engine, Figures, docker
from tests.servers import Cluster

pytestmark = pytest.mark.timeout(1800)

# The derived Dockerfile exactly as docs/containers.md shows it (the base image's name aside).
RECIPE = """\
FROM {image}
USER root
COPY myjobs /tmp/myjobs
RUN /opt/dproc/bin/python -m ensurepip \\
    && /opt/dproc/bin/python -m pip install --no-cache-dir /tmp/myjobs \\
    && /opt/dproc/bin/python -m pip uninstall --yes pip setuptools \\
    && rm -rf /tmp/myjobs
USER 10001:10001
ENV DP_HANDLER=myjobs:handle DP_TRANSACTIONAL=1
"""

HANDLER = '''"""A transactional handler: its row commits with the record's completion."""


def handle(record, conn):
    conn.execute("INSERT INTO myjobs_done (record_id, payload) VALUES (%s, %s)", (record.id, record.payload["x"]))
'''

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "myjobs"
version = "1.0"
"""


def test_docs_recipe_builds_a_derived_image_that_runs_your_handler(
    engine: Engine, image: str, cluster: Cluster, figures: Figures, tmp_path: Path
) -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "containers.md").read_text()
    assert RECIPE.replace("{image}", "dproc") in docs, "docs/containers.md shows this recipe"
    context = tmp_path / "derived"
    (context / "myjobs" / "myjobs").mkdir(parents=True)
    (context / "myjobs" / "myjobs" / "__init__.py").write_text(HANDLER)
    (context / "myjobs" / "pyproject.toml").write_text(PYPROJECT)
    (context / "Dockerfile").write_text(RECIPE.format(image=image))
    tag = engine.throwaway_tag("derived")
    seconds = engine.build(context, image, tag)
    figures["derived_image_build_seconds"] = round(seconds, 1)

    host_dsn = create_database(cluster, "derived")
    with DistributedProcessor(host_dsn, queue="jobs") as p:
        p.migrate()
        with psycopg.connect(host_dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE myjobs_done (record_id bigint PRIMARY KEY, payload int NOT NULL)")
        p.add_records([{"x": n} for n in range(100)])
    dsn = f"postgresql://postgres@127.0.0.1:{cluster.port}/derived"
    result = engine.run(tag, "run", "--queue", "jobs", "--stop-when-empty", env={"DATABASE_URL": dsn},
                        detach=False, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    with psycopg.connect(host_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*), sum(payload) FROM myjobs_done").fetchone() == (100, sum(range(100)))
        assert conn.execute("SELECT count(*) FROM processing_queue WHERE status = 'completed'").fetchone() == (100,)
    probe = engine.run(tag, "-c", "import importlib.util as u; print(u.find_spec('pip'), u.find_spec('myjobs'))",
                       detach=False, options=("--entrypoint", "python"))
    assert probe.stdout.startswith("None ModuleSpec"), probe.stdout + probe.stderr  # no pip left, the handler in
    assert docker("image", "inspect", "--format", "{{.Config.User}}", tag).stdout.strip() == "10001:10001"
