"""distributed-processor: many processes sharing one PostgreSQL table of records, FIFO, fenced, recoverable."""

from __future__ import annotations

from core.aio import AsyncDistributedProcessor
from core.constants import VERSION as __version__
from core.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    InvalidArgument,
    InvalidPayload,
    NotInTransaction,
    PoolExhausted,
    ProcessorError,
    QueueFull,
    SchemaNotMigrated,
    WrongShard,
)
from core.processor import DistributedProcessor
from core.record import AddResult, Record
from core.retry import RetryPolicy

__all__ = [
    "AddResult",
    "AsyncDistributedProcessor",
    "ConfigurationError",
    "DatabaseUnavailable",
    "DistributedProcessor",
    "InvalidArgument",
    "InvalidPayload",
    "NotInTransaction",
    "PoolExhausted",
    "ProcessorError",
    "QueueFull",
    "Record",
    "RetryPolicy",
    "SchemaNotMigrated",
    "WrongShard",
    "__version__",
]
