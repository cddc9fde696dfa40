"""Typed errors raised by distributed-processor.

Every error a caller can act on has its own class, all deriving from :class:`ProcessorError`, so callers can
catch the family or one member. Messages name the offending input; none ever contains a password.
"""

from __future__ import annotations


class ProcessorError(Exception):
    """Base class of every error raised by this package."""


class ConfigurationError(ProcessorError, ValueError):
    """A setting is malformed or out of range (DSN, batch size, schema name, ...)."""


class InvalidPayload(ProcessorError, ValueError):
    """A payload is not a JSON-serialisable dict. ``index`` is its position in the batch."""

    def __init__(self, index: int, reason: str) -> None:
        self.index = index
        self.reason = reason
        super().__init__(f"payload at index {index} is invalid: {reason}; nothing of this batch was written")


class InvalidArgument(ProcessorError, ValueError):
    """An argument other than a payload is invalid (unknown status filter, negative batch size, ...)."""


class NotInTransaction(InvalidArgument):
    """``conn`` given to ``add_records`` is not in a transaction (autocommit outside a transaction block, or an
    aborted transaction): the records would not be atomic with the application's writes. Nothing was written."""


class WrongShard(InvalidArgument):
    """A record given to ``add_records(conn=...)`` on a shard's connection belongs to another shard (its key's
    partition is ``shard``'s), or the connection's shard takes no such record now (a partition moving, a shard
    retiring: ``shard`` is None or the connection's). Nothing was written."""

    def __init__(self, message: str, shard: int | None = None) -> None:
        self.shard = shard
        super().__init__(message)


class FlowDefinitionError(InvalidArgument):
    """A flow template is invalid where it is defined: a step defined twice, a dependency on a step it does not
    define (or not yet: a step may only follow steps defined before it), a cycle, a bad option."""


class FlowDefinitionChanged(ProcessorError):
    """``start_flow`` with a template whose definition differs from the one stored for the same name and
    version: give the changed template a new version (runs keep the version they started with). Nothing was
    written."""

    def __init__(self, flow: str, version: int) -> None:
        self.flow = flow
        self.version = version
        super().__init__(f"flow {flow!r} version {version} is stored with another definition: a changed template "
                         "needs a new version; nothing was written")


class DatabaseUnavailable(ProcessorError):
    """The database could not be reached within the connect timeout, or the connection broke mid-call."""

    #: False when the connect timeout was already spent waiting: retrying at once would only wait again.
    retryable: bool = True
    #: True for a deadlock or a serialization failure: the server rolled the transaction back, nothing of it
    #: was written, and running it again is safe.
    rolled_back: bool = False


class SchemaNotMigrated(ProcessorError):
    """The database is reachable but the processor's tables are missing, or a run found them at an older
    migration than this code's: run ``dproc migrate``."""


class QueueFull(ProcessorError):
    """Adding the batch would take the queue past its ``max_pending`` limit. Nothing was written."""

    def __init__(self, queue: str, limit: int, depth: int, adding: int) -> None:
        self.queue = queue
        self.limit = limit
        self.depth = depth
        self.adding = adding
        super().__init__(
            f"queue {queue!r} is full: limit {limit} pending, depth {depth}, batch of {adding} rejected"
        )


class PoolExhausted(DatabaseUnavailable):
    """Every pooled connection stayed busy for the whole wait: more concurrent callers than connections."""

    retryable = False
