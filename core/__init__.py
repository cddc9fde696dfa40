"""distributed-processor: many processes sharing one PostgreSQL table of records, FIFO, fenced, recoverable."""

from __future__ import annotations

__version__ = "0.1.0"

from core.errors import (  # noqa: E402
    ConfigurationError,
    DatabaseUnavailable,
    InvalidArgument,
    InvalidPayload,
    PoolExhausted,
    ProcessorError,
    QueueFull,
    SchemaNotMigrated,
)
from core.processor import AddResult, DistributedProcessor  # noqa: E402
from core.record import Record  # noqa: E402
from core.retry import RetryPolicy  # noqa: E402

__all__ = [
    "AddResult",
    "ConfigurationError",
    "DatabaseUnavailable",
    "DistributedProcessor",
    "InvalidArgument",
    "InvalidPayload",
    "PoolExhausted",
    "ProcessorError",
    "QueueFull",
    "Record",
    "RetryPolicy",
    "SchemaNotMigrated",
    "__version__",
]
