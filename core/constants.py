"""The package version, record and instance states: importable without SQLAlchemy (workers never load it)."""

from __future__ import annotations

VERSION = "0.1.0"

# waiting: a flow step whose parents have not all finished (core/flows/); outside the claim index until then.
STATUSES = ("pending", "processing", "completed", "failed", "cancelled", "waiting")
FINAL_STATUSES = ("completed", "failed", "cancelled")
INSTANCE_STATUSES = ("running", "stopping", "stopped", "dead")
FLOW_RUN_STATUSES = ("running", "completed", "failed", "cancelled")
