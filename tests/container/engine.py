"""The Docker engine for the container tests: the base image, the project's image, and everything a test starts.

Every container, image and network a test makes carries the run's label or a throwaway tag and is removed by
:meth:`Engine.cleanup`, also when the test fails. One thing is kept on purpose, as a cache across runs: the
base image made from Debian's packages (its tag names what it contains, so a changed recipe makes a new one
and the older one is removed then).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.dsn import redact
from tests.support import ROOT

# The Dockerfile's default base, tried first; without registry access the base is made from Debian's packages.
REGISTRY_BASE = "python:3.13-slim"
BASE_REPO = "dproc-test-base"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = os.environ.get("DP_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# `python` and `pip` on the PATH (python-is-python3, python3-pip), venv for the Dockerfile's virtualenv.
BASE_PACKAGES = ("python3", "python3-pip", "python3-venv", "python-is-python3", "ca-certificates")
BASE_RECIPE = 1  # bump when make_debian_base changes what it puts in the image
# Certificate authorities this machine trusts beyond Debian's (a TLS-intercepting egress proxy's): the base
# trusts them too, so that pip in the image build reaches PyPI from here as it does from the host.
LOCAL_CAS = "/usr/local/share/ca-certificates"
LABEL = "io.dproc.test-run"


class DockerError(AssertionError):
    """A docker command failed; the message has its command line and the end of its output."""


def docker(*args: str, input: str | None = None, timeout: float = 120,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``docker ARGS``; with ``check`` a non-zero exit raises :class:`DockerError`."""
    # The legacy builder unless the caller chose: it needs no buildx plugin and takes --network host as is.
    env = {**os.environ, "DOCKER_BUILDKIT": os.environ.get("DOCKER_BUILDKIT", "0")}
    try:
        result = subprocess.run(["docker", *args], input=input, capture_output=True, text=True, timeout=timeout,
                                env=env)
    except subprocess.TimeoutExpired:
        raise DockerError(redact(f"docker {' '.join(args)[:300]}: no answer within {timeout:g}s")) from None
    if check and result.returncode != 0:
        # The command line carries DSNs (--env DATABASE_URL=...): never a password in a failure message.
        raise DockerError(redact(f"docker {' '.join(args)[:300]} exited {result.returncode}:\n"
                                 f"{(result.stdout + result.stderr)[-3000:]}"))
    return result


def engine_problem() -> str | None:
    """Why no Docker engine can be used here, or None when one answers."""
    if shutil.which("docker") is None:
        return "no docker client on the PATH (Debian package docker.io)"
    try:
        result = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                                text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "the Docker engine does not answer `docker info` within 30 s"
    if result.returncode != 0 or not result.stdout.strip():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return f"no Docker engine answers `docker info` ({last}); as root: dockerd --iptables=false &"
    return None


def image_exists(ref: str) -> bool:
    return docker("image", "inspect", ref, check=False, timeout=30).returncode == 0


def inspect(kind: str, ref: str) -> Any:
    return json.loads(docker(kind, "inspect", ref, timeout=30).stdout)[0]


# ---------------------------------------------------------------------------------------------- base image


def debian_base_tag() -> str:
    """The base's tag: a digest of the recipe, the suite, the mirror, the packages and the extra CAs."""
    digest = hashlib.sha256(json.dumps([BASE_RECIPE, DEBIAN_SUITE, DEBIAN_MIRROR, BASE_PACKAGES]).encode())
    for ca in sorted(glob.glob(f"{LOCAL_CAS}/**/*.crt", recursive=True)):
        digest.update(Path(ca).read_bytes())
    return f"{BASE_REPO}:{DEBIAN_SUITE}-python3-{digest.hexdigest()[:12]}"


def make_debian_base(tag: str, log: Path) -> None:
    """``debootstrap --variant=minbase`` of Debian with Python into a folder, trimmed, ``docker import``-ed."""
    if os.geteuid() != 0:
        raise DockerError("making the base image from Debian's packages needs root (debootstrap)")
    if shutil.which("debootstrap") is None and not Path("/usr/sbin/debootstrap").exists():
        raise DockerError("no registry image and no debootstrap to make one (apt-get install debootstrap)")
    work = Path(tempfile.mkdtemp(prefix="dproc-base-", dir="/var/tmp"))  # /tmp may be noexec or a small tmpfs
    root = work / "root"
    try:
        with open(log, "w") as out:
            subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                            DEBIAN_SUITE, str(root), DEBIAN_MIRROR],
                           stdout=out, stderr=subprocess.STDOUT, check=True, timeout=1200)
            cas = sorted(glob.glob(f"{LOCAL_CAS}/**/*.crt", recursive=True))
            if cas:
                for ca in cas:
                    shutil.copy(ca, root / "usr/local/share/ca-certificates" / Path(ca).name)
                subprocess.run(["chroot", str(root), "update-ca-certificates"], stdout=out,
                               stderr=subprocess.STDOUT, check=True, timeout=120)
        _unmount_under(root)
        # What a slim image leaves out: package caches and lists, documentation, translations.
        for junk in ("var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/locale"):
            shutil.rmtree(root / junk, ignore_errors=True)
        tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        try:
            subprocess.run(["docker", "import", "--change", 'CMD ["python3"]', "--change", "ENV LANG=C.UTF-8",
                            "-", tag], stdin=tar.stdout, capture_output=True, check=True, timeout=600)
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait(60)
    except subprocess.CalledProcessError as exc:
        raise DockerError(f"{' '.join(map(str, exc.cmd))[:200]} failed; see {log}") from None
    finally:
        _unmount_under(root)
        shutil.rmtree(work, ignore_errors=True)


def _unmount_under(root: Path) -> None:
    # debootstrap mounts /proc and /sys into the tree and may leave them mounted when it fails: never delete
    # through a mount.
    with open("/proc/mounts") as fh:
        points = [line.split()[1] for line in fh if line.split()[1].startswith(str(root) + "/")]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=60)


def remove_stale_bases(keep: str) -> list[str]:
    """Other tags of the base repository: made by an older recipe, of no further use."""
    tags = docker("images", BASE_REPO, "--format", "{{.Repository}}:{{.Tag}}", timeout=30).stdout.split()
    stale = [t for t in tags if t != keep]
    for tag in stale:
        docker("rmi", tag, check=False, timeout=120)
    return stale


# ---------------------------------------------------------------------------------------------- the run


@dataclass
class Figures:
    """What the run measured, printed at the end of the session (and written as JSON when asked)."""

    values: dict[str, Any] = field(default_factory=dict)

    def __setitem__(self, key: str, value: Any) -> None:
        self.values[key] = value

    def lines(self) -> list[str]:
        return [f"  {k}: {v}" for k, v in self.values.items()]


class Engine:
    """The engine as one test session uses it: a run id, a label on every container, throwaway image tags."""

    def __init__(self) -> None:
        self.run_id = secrets.token_hex(4)
        self.label = f"{LABEL}={self.run_id}"
        self.images: list[str] = []
        self.compose_projects: list[tuple[list[str], str]] = []
        self.compose = ["docker-compose"]  # the compose tool's command (the fixture compose_cmd finds it)

    def name(self, what: str) -> str:
        return f"dproc-test-{self.run_id}-{what}"

    def throwaway_tag(self, what: str) -> str:
        tag = f"dproc-test-{what}:{self.run_id}"
        self.images.append(tag)
        return tag

    def snapshot(self, into: Path) -> Path:
        """A copy of the build context, what ``.dockerignore`` lets through: builds from it see one version of
        the sources, however the checkout changes meanwhile."""
        allowed = [line[1:].strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
                   if line.startswith("!")]
        for name in ("Dockerfile", ".dockerignore", *allowed):
            source = ROOT / name
            if source.is_dir():
                shutil.copytree(source, into / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(source, into / name)
        return into

    def build(self, context: Path, base: str, tag: str, *extra: str, timeout: float = 1200) -> float:
        """``docker build`` of ``context`` on ``base``; the seconds it took."""
        started = time.monotonic()
        # --network host: with dockerd --iptables=false the default bridge has no way out, and pip needs PyPI.
        docker("build", "--network", "host", "--build-arg", f"PYTHON_IMAGE={base}", "-t", tag, *extra, str(context),
               timeout=timeout)
        return time.monotonic() - started

    def run(self, image: str, *args: str, name: str | None = None, env: dict[str, str] | None = None,
            detach: bool = True, input: str | None = None, timeout: float = 120,
            options: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        """``docker run`` on the host's network (containers reach the test's PostgreSQL on 127.0.0.1)."""
        argv = ["run", "--network", "host", "--label", self.label, *options]
        argv += ["--detach"] if detach else ["--rm"] + (["--interactive"] if input is not None else [])
        if name:
            argv += ["--name", name]
        for key, value in (env or {}).items():
            argv += ["--env", f"{key}={value}"]
        return docker(*argv, image, *args, input=input, timeout=timeout, check=detach)

    def state(self, container: str) -> dict[str, Any]:
        state: dict[str, Any] = inspect("container", container)["State"]
        return state

    def cleanup(self) -> list[str]:
        """Remove every container, compose project and image of this run; what could not be removed."""
        problems: list[str] = []
        for files, project in self.compose_projects:
            result = subprocess.run([*self.compose, *files, "-p", project, "down", "--volumes",
                                     "--remove-orphans", "--timeout", "5"], capture_output=True, text=True,
                                    timeout=180)
            if result.returncode != 0:
                problems.append(f"compose project {project}: {result.stderr[-500:]}")
        for selector in (f"label={self.label}", *(f"label=com.docker.compose.project={p}"
                                                 for _, p in self.compose_projects)):
            ids = docker("ps", "-aq", "--filter", selector, timeout=30).stdout.split()
            if ids:
                docker("rm", "--force", "--volumes", *ids, check=False, timeout=120)
            for net in docker("network", "ls", "-q", "--filter", selector, timeout=30).stdout.split():
                docker("network", "rm", net, check=False, timeout=60)
        for tag in reversed(self.images):
            if image_exists(tag):
                result = docker("rmi", "--force", tag, check=False, timeout=180)
                if result.returncode != 0:
                    problems.append(f"image {tag}: {result.stderr[-300:]}")
        left = docker("ps", "-aq", "--filter", f"label={self.label}", timeout=30).stdout.split()
        if left:
            problems.append(f"containers left: {left}")
        return problems


def logs(container: str) -> str:
    result = docker("logs", container, check=False, timeout=60)
    return result.stdout + result.stderr


def wait_for(predicate: Any, timeout: float, message: str, interval: float = 0.2) -> Any:
    """Poll ``predicate`` until it returns a truthy value, at most ``timeout`` seconds (AssertionError)."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while True:
        try:
            value = predicate()
        except DockerError as exc:  # a container between two states; the last error goes into the message
            value, last_error = None, f" (last error: {str(exc)[-300:]})"
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {message}{last_error}")
        time.sleep(interval)
