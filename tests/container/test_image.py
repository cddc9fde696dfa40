"""The image as built: its configuration, a non-root user, nothing of the build left in it."""

from __future__ import annotations

import json

import pytest

from tests.container.engine import Engine, Figures, inspect

pytestmark = pytest.mark.timeout(1800)  # the first test builds the base and the image

PROBE = """
import importlib.util, json, os, sys
import core
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "core": core.__file__, "python": sys.version.split()[0],
    "build_modules": [m for m in ("pip", "setuptools", "wheel", "hatchling") if importlib.util.find_spec(m)],
    "venv_bin": sorted(os.listdir("/opt/dproc/bin")),
    "sources": [p for p in ("/src", "/src/pyproject.toml") if os.path.exists(p)],
    "migrations": os.path.isfile(os.path.join(os.path.dirname(core.__file__), "_migrations", "env.py")),
    "pip_cache": os.path.exists(os.path.expanduser("~/.cache/pip")) or os.path.exists("/root/.cache/pip"),
}))
"""


def test_image_configuration(image: str, figures: Figures) -> None:
    config = inspect("image", image)["Config"]
    assert config["Entrypoint"] == ["dproc"] and config["Cmd"] == ["run"]
    assert config["User"] == "10001:10001"
    assert config["StopSignal"] == "SIGTERM"
    assert config["Healthcheck"]["Test"][:3] == ["CMD", "dproc", "health"]
    assert "8080/tcp" in config["ExposedPorts"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["DP_HEALTH_PORT"] == "8080" and env["DP_LOG_FORMAT"] == "json"
    assert env["PATH"].startswith("/opt/dproc/bin:")


def test_image_runs_as_non_root_with_nothing_of_the_build(engine: Engine, image: str, figures: Figures) -> None:
    result = engine.run(image, "-c", PROBE, detach=False, options=("--entrypoint", "python"))
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert (facts["uid"], facts["gid"]) == (10001, 10001)
    assert facts["core"].startswith("/opt/dproc/lib/")
    assert facts["migrations"], "the wheel carries the migrations"
    assert facts["build_modules"] == [], "pip, setuptools, wheel or hatchling left in the virtualenv"
    assert not any(name.startswith("pip") for name in facts["venv_bin"])
    assert facts["sources"] == [] and not facts["pip_cache"]
    figures["image_python"] = facts["python"]
    help_text = engine.run(image, "--help", detach=False)
    assert help_text.returncode == 0 and "usage: dproc" in help_text.stdout
