# distributed-processor worker image: `docker build -t dproc .`
# Run N replicas against one database: DATABASE_URL=... DP_HANDLER=mypkg.jobs:handle docker run dproc
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DP_LOG_FORMAT=json \
    DP_HEALTH_PORT=8080

WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY core ./core
COPY migrations ./migrations
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 10001 dproc

# Your handlers: copy your package in a derived image (or mount it) and set DP_HANDLER.
USER dproc
EXPOSE 8080

# `dproc health` exits 0 only when the database is reachable, migrated and responsive.
HEALTHCHECK --interval=15s --timeout=10s --start-period=20s --retries=3 \
    CMD ["dproc", "health", "--timeout", "5"]

# SIGTERM drains in-flight records for DP_GRACE_SECONDS (default 30) and exits 0;
# set the orchestrator's stop grace period a little longer than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["dproc"]
CMD ["run"]
