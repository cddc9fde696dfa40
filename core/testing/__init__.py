"""A testing kit: :class:`InMemoryProcessor` (the API and behaviour of :class:`core.DistributedProcessor`,
in memory) and :class:`FakeClock` (time that passes when a test says so).

``run()`` of an in-memory processor is the real worker loop, in threads; transactional handlers, which are
called with a database connection, are refused with :class:`NoDatabase`, as are ``connection()`` and
``complete_on()``. Several processors over the same :class:`MemoryTables` are instances of one queue.
:func:`drain` runs a processor's records through a handler and returns the :class:`Outcomes`.
"""

from __future__ import annotations

from core.testing.clock import FakeClock
from core.testing.drain import Attempt, Outcomes, drain
from core.testing.errors import NoDatabase
from core.testing.memory import InMemoryProcessor
from core.testing.tables import MemoryTables

__all__ = ["Attempt", "FakeClock", "InMemoryProcessor", "MemoryTables", "NoDatabase", "Outcomes", "drain"]
