"""The package version, record and instance states: importable without SQLAlchemy (workers never load it)."""

from __future__ import annotations

VERSION = "0.1.0"

STATUSES = ("pending", "processing", "completed", "failed", "cancelled")
FINAL_STATUSES = ("completed", "failed", "cancelled")
INSTANCE_STATUSES = ("running", "stopping", "stopped", "dead")
