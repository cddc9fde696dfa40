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
        # no flow children taken by the settlement: the whole batch
        ("LIMIT greatest(0, %(batch)s - (SELECT count(*) FROM settled))", "LIMIT %(batch)s"),
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
