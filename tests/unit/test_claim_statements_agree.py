"""The lean claim statement (core/sql/claimlean.sql) is the full one (core/sql/claims.sql) without the parts that
only queue control and flows use, and says every other part is the same text. This holds it to that: each
part of the lean statement is the full statement's part of the same name with exactly the differences listed
here, so a fix made to one statement and not the other fails here instead of drifting."""

from __future__ import annotations

import re

import pytest

from core.queries import raw_statements

_PART = re.compile(r"^(?:WITH )?(\w+) AS (?:MATERIALIZED )?\($", re.MULTILINE)

# Per part: (the full statement's text, the lean statement's text in its place). Everything else must match.
DIFFERENCES: dict[str, list[tuple[str, str]]] = {
    "done": [
        ("WITH done AS (", "done AS ("),  # the lean statement starts with its gate
        ("dedupe_held = false,\nresult = CASE WHEN %(done_results)s::jsonb[] IS NOT NULL\n"
         "THEN (%(done_results)s::jsonb[])[width_bucket(d.id, %(done_ids)s::bigint[])] END",
         "dedupe_held = false"),  # no flow step's result
        ("RETURNING d.id, d.ordering_key, d.status, d.flow_run_id", "RETURNING d.ordering_key"),
    ],
    "picked": [
        # no key rate
        ("WHERE l.ordering_key IS NULL OR CASE WHEN (", "WHERE l.ordering_key IS NULL OR ("),
        (") THEN NOT (SELECT EXISTS (SELECT 1 FROM {key_rates})) OR {key_token_function}(l.ordering_key)\n"
         "ELSE false END\n", ")\n"),
        # no queue rate
        ("LIMIT least(%(batch)s, coalesce((SELECT CASE WHEN r.slot IS NOT NULL THEN "
         "greatest(0, floor(r.tokens))::int\nWHEN r.limited THEN 0 END\nFROM rates r WHERE r.queue = qn.name), "
         "%(batch)s))", "LIMIT %(batch)s"),
        # the gate in place of the pause probe
        ("WHERE NOT EXISTS (SELECT 1 FROM {queue_state} ps\nWHERE ps.queue = qn.name AND ps.paused_at IS NOT NULL\n"
         "AND (ps.resume_at IS NULL OR ps.resume_at > now()))", "WHERE (SELECT g.open FROM gate g)"),
    ],
}


def _parts(text: str) -> dict[str, str]:
    heads = list(_PART.finditer(text))
    return {m.group(1): text[m.start():(heads[i + 1].start() if i + 1 < len(heads) else len(text))]
            for i, m in enumerate(heads)}


def _cte(text: str) -> str:
    """A part up to its own closing parenthesis, whole: the one ending the part (``),``), or the one before the
    statement's SELECT (the last part runs into it). Not the first line that starts with one: a part's inner
    subqueries close on lines of their own too, and what follows them would go uncompared."""
    body = text.rstrip()
    if body.endswith("\n),"):
        return body[:-3]
    return text[:text.index("\n)\nSELECT ")]


LEAN = _parts(raw_statements()["claim_lean"])
FULL = _parts(raw_statements()["claim"])


def _parents_read(text: str) -> str:
    """The read of a flow step's parents' results: the full statement's parents part, the lean one's column."""
    start = text.index("(SELECT jsonb_object_agg(g.step, g.val)")
    return text[start:text.index("HAVING count(*) > 0)", start)]


def test_both_statements_read_a_flow_steps_parents_alike() -> None:
    lean = _parents_read(raw_statements()["claim_lean"])
    assert lean == _parents_read(FULL["parents"]).replace("e.child_id = c.id", "e.child_id = claimed.id")
    # and the on_failure step's (every step of its run) from the function, in both
    for statement in ("claim_lean", "claim"):
        assert ("CASE WHEN EXISTS (SELECT 1 FROM {flow_runs} fr\nWHERE fr.id = claimed.flow_run_id AND "
                "fr.on_failure_id = claimed.id)\nTHEN {flow_parents_function}(claimed.id, claimed.flow_run_id)\n"
                "ELSE '{{}}'::jsonb END") in raw_statements()[statement]


def test_the_lean_statement_has_only_the_full_statements_parts_and_its_gate() -> None:
    assert set(LEAN) - set(FULL) == {"gate"}
    # what it leaves out: flow settlement, rates, the parents read ahead, the rates charged
    assert set(FULL) - set(LEAN) == {"settled", "rates", "parents", "charged"}


@pytest.mark.parametrize("part", sorted(set(LEAN) - {"gate"}))
def test_each_shared_part_is_the_same_text_but_for_the_listed_differences(part: str) -> None:
    full = FULL[part]
    for old, new in DIFFERENCES.get(part, []):
        assert full.count(old) == 1, f"{part}: the listed difference is no longer in claims.sql: {old!r}"
        full = full.replace(old, new)
    assert _cte(LEAN[part]) == _cte(full)


# The statement that takes flow children (core/sql/claimflow.sql) against the full one: per part, and its final
# SELECT, the full statement's text with exactly these differences.
FLOW = _parts(raw_statements()["claim_flow"])
FLOW_DIFFERENCES: dict[str, list[tuple[str, str]]] = {
    # the completed records' step, place and result, sent to the settlement (migration 0020)
    "done": [("RETURNING d.id, d.ordering_key, d.status, d.flow_run_id\n",
              "RETURNING d.id, d.ordering_key, d.status, d.flow_run_id, d.step, d.flow_index, d.result\n")],
    "settled": [
        ("SELECT {flow_settle_function}(array_agg(s.id ORDER BY s.id) FILTER (WHERE s.status = 'completed'),\n"
         "array_agg(s.id ORDER BY s.id) FILTER (WHERE s.status = 'cancelled')) AS n\nFROM done s\n"
         "WHERE s.flow_run_id IS NOT NULL\nHAVING count(*) > 0",
         "SELECT t.*\nFROM (SELECT array_agg(s.id ORDER BY s.id) FILTER (WHERE s.status = 'completed') AS ok,\n"
         "array_agg(s.id ORDER BY s.id) FILTER (WHERE s.status = 'cancelled') AS ended,\n"
         "array_agg(s.flow_run_id ORDER BY s.id) FILTER (WHERE s.status = 'completed') AS ok_runs,\n"
         "array_agg(CASE WHEN s.flow_index IS NULL THEN jsonb_build_object(s.step, s.result) END\n"
         "ORDER BY s.id) FILTER (WHERE s.status = 'completed') AS ok_parents\nFROM done s\n"
         "WHERE s.flow_run_id IS NOT NULL\nHAVING count(*) > 0) a\n"
         "CROSS JOIN LATERAL {flow_settle_take_function}(a.ok, a.ended, %(queues)s::text[], %(batch)s, "
         "%(token)s::uuid,\n%(instance_id)s, %(lease_seconds)s, a.ok_runs, a.ok_parents) t"),
    ],
    "picked": [("LIMIT %(batch)s\n", "LIMIT greatest(0, %(batch)s - (SELECT count(*) FROM settled))\n")],
}
FLOW_FINAL_DIFFERENCES = [
    ("THEN coalesce(par.parents,", "THEN coalesce(claimed.taken_parents, par.parents,"),
    ("(SELECT count(*) FROM done) + 0 * (SELECT count(*) FROM notified) + 0 * (SELECT count(*) FROM settled)\n"
     "AS completed,", "(SELECT count(*) FROM done) + 0 * (SELECT count(*) FROM notified) AS completed,"),
    ("LEFT JOIN claimed ON true\n",
     "LEFT JOIN (SELECT c.id, c.queue, c.payload, c.priority, c.attempts, c.max_attempts, c.claimed_at,\n"
     "c.lease_expires_at, c.run_at, c.created_at, c.ordering_key, c.dedupe_key, c.cancel_requested,\n"
     "c.flow_run_id, c.step, c.trace_context, NULL::jsonb AS taken_parents\nFROM claimed c\nUNION ALL\n"
     "SELECT t.id, t.queue, t.payload, t.priority, t.attempts, t.max_attempts, t.claimed_at,\n"
     "t.lease_expires_at, t.run_at, t.created_at, t.ordering_key, t.dedupe_key, t.cancel_requested,\n"
     "t.flow_run_id, t.step, t.trace_context, t.parents\nFROM settled t) claimed ON true\n"),
]


def _final(text: str) -> str:
    return text[text.index("\n)\nSELECT ") + 3:]


def test_the_flow_statement_has_the_full_statements_parts() -> None:
    assert set(FLOW) == set(FULL)


@pytest.mark.parametrize("part", sorted(FULL))
def test_each_part_of_the_flow_statement_is_the_full_ones_but_for_the_listed_differences(part: str) -> None:
    full = FULL[part]
    for old, new in FLOW_DIFFERENCES.get(part, []):
        assert full.count(old) == 1, f"{part}: the listed difference is no longer in claims.sql: {old!r}"
        full = full.replace(old, new)
    assert _cte(FLOW[part]) == _cte(full)


def test_the_flow_statements_final_select_is_the_full_ones_but_for_the_listed_differences() -> None:
    full = _final(raw_statements()["claim"])
    for old, new in FLOW_FINAL_DIFFERENCES:
        assert full.count(old) == 1, f"the listed difference is no longer in claims.sql: {old!r}"
        full = full.replace(old, new)
    assert _final(raw_statements()["claim_flow"]) == full
