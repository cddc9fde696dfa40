"""The worker's HTTP endpoint: liveness, readiness, the full health report, and Prometheus metrics.

Runs on a daemon thread of the worker process. Nothing secret is ever served: the DSN is redacted in the
health report and no configuration beyond it is exposed.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from core.api import ProcessorAPI

log = logging.getLogger("core.http")


class HealthServer:
    """Serve ``/health/live``, ``/health/ready``, ``/health`` and ``/metrics`` for one processor."""

    def __init__(self, processor: ProcessorAPI, host: str, port: int, *, live_within: float = 30.0) -> None:
        self.p = processor
        self.live_within = live_within
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # the http.server API names it so
                try:
                    code, ctype, body = server.route(self.path.split("?", 1)[0])
                except Exception as exc:  # never let a probe kill the server thread
                    log.exception("health endpoint error")
                    code, ctype, body = 500, "application/json", json.dumps({"error": type(exc).__name__}).encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # probes are too frequent to log
                return

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="dp-http", daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        log.info("health endpoint listening", extra={"port": self.port})
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)

    # ------------------------------------------------------------------ routes

    def route(self, path: str) -> tuple[int, str, bytes]:
        if path == "/health/live":
            worker = self.p.worker
            alive = worker is not None and not worker.finished.is_set() and worker.ticked_within(self.live_within)
            return self._json(200 if alive else 503, {"live": alive})
        if path == "/health/ready":
            ready, reason = self.p.ready()
            body: dict[str, Any] = {"ready": ready}
            if reason:
                body["reason"] = reason
            return self._json(200 if ready else 503, body)
        if path == "/health":
            report = self.p.health_check(timeout=3.0)
            worker = self.p.worker
            if worker is not None:
                report["worker"] = {
                    "held": worker.held_count(),
                    "stopping": worker.stopping.is_set(),
                    "summary": worker.summary.as_dict(),
                    "listener_connected": bool(worker.listener and worker.listener.connected.is_set()),
                }
            return self._json(503 if report["status"] == "unhealthy" else 200, report)
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, self.p.metrics.render(self._refresh_gauges)
        paths = ["/health/live", "/health/ready", "/health", "/metrics"]
        return self._json(404, {"error": "not found", "paths": paths})

    def _refresh_gauges(self) -> None:
        worker = self.p.worker
        if worker is not None:
            self.p.metrics.set_in_flight(worker.held_count())
        try:
            status = self.p.get_queue_status()
        except Exception:
            return
        for name, q in status["queues"].items():
            self.p.metrics.queue_depth.labels(queue=name).set(q["pending"])
            self.p.metrics.queue_paused.labels(queue=name).set(1 if q.get("paused") else 0)
        for name in status.get("paused", {}):
            self.p.metrics.queue_paused.labels(queue=name).set(1)
        try:
            self.p.metrics.horizon_age.set(self.p.horizon()["age_seconds"])
        except Exception:  # a gauge is best effort; /health reports the cause
            return

    @staticmethod
    def _json(code: int, body: dict[str, Any]) -> tuple[int, str, bytes]:
        return code, "application/json", json.dumps(body, default=str).encode()
