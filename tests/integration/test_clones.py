"""The test databases made ahead (core/testing/postgres.py: Clones): fresh copies of the template, each to one
taker, every one dropped by close(); a copy that cannot be made is the taker's error, not a hang."""

from __future__ import annotations

import psycopg
import pytest

from core.testing.postgres import Clones, Server, unique_name


def _copies(server: Server, prefix: str) -> list[str]:
    with server.admin() as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s) ORDER BY 1",
                            (prefix + "_",)).fetchall()
    return [r[0] for r in rows]


def test_copies_are_fresh_distinct_and_all_dropped_by_close(dp_server: Server, dp_template: str) -> None:
    prefix = unique_name("dp_cl")
    clones = Clones(dp_server, dp_template, ahead=2, prefix=prefix)
    try:
        names = [clones.take() for _ in range(5)]
        assert len(set(names)) == 5 and all(n.startswith(prefix) for n in names)
        with psycopg.connect(dp_server.dsn_for(names[0]), autocommit=True) as conn:  # a migrated copy
            conn.execute("INSERT INTO processing_queue (queue, payload) VALUES ('q', '{}')")
        with psycopg.connect(dp_server.dsn_for(names[1])) as conn:  # untouched by what the first got
            assert conn.execute("SELECT count(*) FROM processing_queue").fetchone() == (0,)
        clones.drop(names[0])
        made = _copies(dp_server, prefix)
        assert set(names[1:]) <= set(made) and len(made) <= 5 + 2  # at most `ahead` made beyond the takes
    finally:
        clones.close()
    assert _copies(dp_server, prefix) == []  # given back, taken and kept, made ahead: every one


def test_a_copy_that_cannot_be_made_is_the_takers_error(dp_server: Server) -> None:
    prefix = unique_name("dp_cl")
    clones = Clones(dp_server, "dp_no_such_template", prefix=prefix)
    try:
        with pytest.raises(RuntimeError, match="copying 'dp_no_such_template' failed"):
            clones.take(timeout=60)
    finally:
        clones.close()
    assert _copies(dp_server, prefix) == []
