"""``dproc dashboard``: refusals before anything starts, and a real server answering behind basic auth."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from core.cli import main
from core.web.security import is_loopback, parse_credentials
from tests.support import ROOT, wait_until


@pytest.fixture(autouse=True)
def _no_faulthandler(monkeypatch: pytest.MonkeyPatch) -> None:
    # main() registers a SIGUSR1 stack dump on stderr's file descriptor, which captured output has not
    monkeypatch.setattr("core.cli.faulthandler.register", lambda *a, **k: None)


def test_a_public_bind_without_auth_is_refused(dsn: str, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DP_DASHBOARD_AUTH", raising=False)
    assert main(["--dsn", dsn, "dashboard", "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err
    assert "refusing to serve the dashboard on 0.0.0.0 without authentication" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(("env", "args", "message"), [
    ("nocolon", [], "DP_DASHBOARD_AUTH must be user:password"),
    (":password", [], "DP_DASHBOARD_AUTH must be user:password"),
    (None, ["--auth-file", "/nonexistent/auth"], "cannot read --auth-file"),
])
def test_bad_credentials_are_refused(dsn: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                     env: str | None, args: list[str], message: str) -> None:
    if env is None:
        monkeypatch.delenv("DP_DASHBOARD_AUTH", raising=False)
    else:
        monkeypatch.setenv("DP_DASHBOARD_AUTH", env)
    assert main(["--dsn", dsn, "dashboard", "--host", "0.0.0.0", *args]) == 1
    assert message in capsys.readouterr().err


def test_without_the_web_extra_one_line_says_what_to_install(dsn: str, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "core.web" or m.startswith("core.web.")]:
        monkeypatch.delitem(sys.modules, name)
    for name in [m for m in sys.modules if m.split(".")[0] == "starlette"] + ["starlette"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    assert main(["--dsn", dsn, "dashboard"]) == 1
    assert capsys.readouterr().err == (
        "dproc: error: the dashboard needs the web extra: pip install 'distributed-processor[web]'\n")


def test_importing_core_does_not_import_the_web_stack() -> None:
    code = "import sys, core, core.cli, core.commands; sys.exit(int(any(m in sys.modules for m in " \
           "('starlette', 'jinja2', 'uvicorn', 'core.web'))))"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60).returncode == 0


def test_credentials_and_loopback() -> None:
    assert parse_credentials("ops:a:b\n", "x") == ("ops", "a:b")
    assert [is_loopback(h) for h in ("127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost", "0.0.0.0",
                                     "10.0.0.1", "example.com")] == [True, True, True, True, True, False, False,
                                                                     False]


def _get(url: str, auth: str | None = None) -> Any:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return None, ""


def test_the_command_serves_the_dashboard_behind_basic_auth(dsn: str, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port free a moment ago; the server gets it unless someone is quicker
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = tmp_path / "auth"
    secret.write_text("ops:s3cret\n")
    env = {**os.environ, "DATABASE_URL": dsn}
    env.pop("DP_DASHBOARD_AUTH", None)
    proc = subprocess.Popen([sys.executable, "-m", "core", "dashboard", "--port", str(port), "--auth-file",
                             str(secret), "--read-only"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        status, _ = wait_until(lambda: (r := _get(url))[0] and r, timeout=30, message="dashboard answering")
        assert status == 401
        status, body = _get(url, "ops:s3cret")
        assert status == 200 and "read-only" in body
        assert _get(url, "ops:wrong")[0] == 401
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert f"dproc dashboard (read-only) on http://127.0.0.1:{port}/ (basic auth)" in err
