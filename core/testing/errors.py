"""The typed error of what an in-memory processor cannot do: anything that needs a database connection."""

from __future__ import annotations

from core.errors import ConfigurationError


class NoDatabase(ConfigurationError):
    """The in-memory processor has no database: ``connection()``, ``complete_on()`` and transactional
    handlers (``run(transactional=True)``, which are called with a connection) are refused with this.

    A :class:`~core.errors.ConfigurationError`, as the real processor's refusal of a run the server can
    never hold connections for."""
