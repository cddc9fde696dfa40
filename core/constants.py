"""Record and instance states, importable without SQLAlchemy (workers never load it)."""

from __future__ import annotations

STATUSES = ("pending", "processing", "completed", "failed", "cancelled")
FINAL_STATUSES = ("completed", "failed", "cancelled")
INSTANCE_STATUSES = ("running", "stopping", "stopped", "dead")
