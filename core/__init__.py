"""distributed-processor: many processes sharing one PostgreSQL table of records, FIFO, fenced, recoverable."""

from __future__ import annotations

from core.constants import VERSION as __version__
from core.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    InvalidArgument,
    InvalidPayload,
    PoolExhausted,
    ProcessorError,
    QueueFull,
    SchemaNotMigrated,
)
from core.processor import DistributedProcessor
from core.record import AddResult, Record
from core.retry import RetryPolicy

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
