# distributed-processor worker image.
#   docker build -t dproc .
#   docker build --build-arg PYTHON_IMAGE=registry.example.com/python:3.13-slim -t dproc .
# Run N replicas against one database: docker run -e DATABASE_URL=... -e DP_HANDLER=mypkg.jobs:handle dproc
# Any base image with `python` (3.10 or newer) and `pip` on its PATH works: the package is installed into a
# virtualenv, so the base's own pip policy (Debian's "externally managed" Python) does not matter.
# It builds with BuildKit and with the legacy builder alike (no BuildKit-only syntax).
ARG PYTHON_IMAGE=python:3.13-slim

# ---------------------------------------------------------------- build: the wheel and its dependencies
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/dproc
WORKDIR /src
COPY pyproject.toml README.md ./
COPY core ./core
COPY migrations ./migrations
# pip builds the wheel with hatchling in an isolated environment of its own and installs it with its
# dependencies (compiled to bytecode, so that a start imports without compiling). pip and setuptools leave
# the virtualenv: the runtime stage gets the installed package and nothing of the build.
RUN /opt/dproc/bin/python -m pip install . \
    && /opt/dproc/bin/python -m pip uninstall --yes pip setuptools \
    && /opt/dproc/bin/dproc --help >/dev/null

# ---------------------------------------------------------------- runtime: the base plus the virtualenv
FROM ${PYTHON_IMAGE}
# A fixed uid, so that Kubernetes' runAsNonRoot can verify it (deploy/kubernetes sets the same).
RUN groupadd --gid 10001 dproc \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin dproc
COPY --from=build /opt/dproc /opt/dproc
ENV PATH=/opt/dproc/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DP_LOG_FORMAT=json \
    DP_HEALTH_PORT=8080
WORKDIR /home/dproc
# Your handlers: an image FROM this one with your package (docs/containers.md), and DP_HANDLER.
USER 10001:10001
EXPOSE 8080

# `dproc health` exits 0 only when the database is reachable, migrated and responsive.
HEALTHCHECK --interval=10s --timeout=10s --start-period=30s --retries=3 \
    CMD ["dproc", "health", "--timeout", "5"]

# SIGTERM drains in-flight records for DP_GRACE_SECONDS (default 30) and exits 0; give the orchestrator a
# longer stop grace than that (docker stop -t 40, compose stop_grace_period, terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["dproc"]
CMD ["run"]
