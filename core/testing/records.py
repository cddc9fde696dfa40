"""The state changes of records in memory, one processor's view of :class:`MemoryTables`: the part of a
store the worker loop needs (:class:`core.testing.run.MemoryRun`) and the facade too
(:class:`core.testing.store.MemoryStore`).

Each method is the in-memory twin of one statement of ``core/sql`` (named in its docstring) and follows its
rules: the same guards (status, fenced lease token), the same columns changed, the same result. What the
real statements do only for speed (claim floors, the ``key_blocked`` hint, NOTIFY, plan settings) has no
twin: a record is claimable here the moment the claim rules allow it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from core.backend import NewRecords
from core.claims import ERROR_TEXT_LIMIT, sorted_records
from core.config import Settings
from core.constants import FINAL_STATUSES, INSTANCE_STATUSES, VERSION
from core.errors import DatabaseUnavailable, QueueFull
from core.floors import Floors
from core.instance import ProcessFacts
from core.payloads import encode_payload
from core.record import AddResult, Claimed, Record, format_error
from core.retry import RetryPolicy
from core.testing import pg
from core.testing.flowqueries import MemoryFlowQueries
from core.testing.tables import MemoryTables, Row

_loads = json.JSONDecoder().decode
# The registry row's columns, in the table's order (list_instances, the check violation's DETAIL).
REGISTRY_COLUMNS = ("instance_id", "hostname", "pid", "version", "started_at", "last_heartbeat_at", "stopped_at",
                     "status", "metadata")


class MemoryRecords:
    """Inserts, claims, outcomes, recovery, retention and the registry over ``tables``, as one instance."""

    def __init__(self, tables: MemoryTables, settings: Settings, facts: ProcessFacts) -> None:
        self.tables = tables
        self.settings = settings
        self.facts = facts
        self.closed = False
        self.flows = MemoryFlowQueries(tables)  # flow records settle in the statements that end them
        self._last_batch = 0  # records the last recovery batch took (a full one: another follows)

    def check_open(self) -> None:
        if self.closed:
            raise DatabaseUnavailable("processor is closed")

    # ------------------------------------------------------------------ producing

    def insert(self, batch: NewRecords) -> AddResult:
        """``insert_records`` with its locks: dedupe keys, the queue limit (QueueFull rolls back), ids."""
        t, n, queue = self.tables, len(batch.payloads), batch.queue
        if n == 0:
            return AddResult()
        limit = self.settings.max_payload_bytes
        texts = [json.dumps(pg.jsonb(_loads(encode_payload(i, p, limit))), separators=(",", ":"))
                 for i, p in enumerate(batch.payloads)]
        pg.text(queue, *batch.keys, *batch.dedupes)
        pg.int4(batch.max_attempts)
        self.check_open()
        with t.lock:
            now = t.now()
            run_at = now if batch.run_at is None else batch.run_at.astimezone(timezone.utc)
            # The id sequence moves on for every input, deduplicated or rolled back (sequences are not
            # transactional); ids follow input order.
            first, t.next_id = t.next_id, t.next_id + n
            ids: list[int] = []
            deduplicated: list[int] = []
            new: list[Row] = []
            taken: dict[str, int] = {}  # dedupe keys this batch holds
            for i, (text, key, dedupe) in enumerate(zip(texts, batch.keys, batch.dedupes, strict=True)):
                if dedupe is not None:
                    holder = taken.get(dedupe) or t.dedupe.get((queue, dedupe))
                    if holder is not None:
                        deduplicated.append(i)
                        ids.append(holder)
                        continue
                    taken[dedupe] = first + i
                new.append(Row(first + i, queue, text, batch.priority, run_at, batch.max_attempts, now,
                               ordering_key=key, dedupe_key=dedupe,
                               dedupe_while=None if dedupe is None else batch.dedupe_while,
                               dedupe_held=dedupe is not None, updated_at=now, trace_context=batch.trace))
                ids.append(first + i)
            cap = t.queue_limits.get(queue)
            if cap is not None and new:
                # The statement counts at most cap + inserted + 1 pending records.
                depth_after = min(len(t.pending_ids(queue)) + len(new), cap + len(new) + 1)
                if depth_after > cap:
                    raise QueueFull(queue, cap, depth_after - len(new), len(new))
            for row in new:
                t.insert(row)
                if row.dedupe_key is not None:
                    t.dedupe[(queue, row.dedupe_key)] = row.id
        if new and self.settings.notify:
            t.changed()
        return AddResult(ids, deduplicated)

    # ------------------------------------------------------------------ claiming and outcomes

    def _held(self, records: Iterable[Record]) -> list[tuple[Record, Row]]:
        """The fence: each record whose row is still ``processing`` under its token, once per row. An id
        offered twice (an old claim and its re-claim) counts with the token on the row: the real statements
        pair each id with its latest claim's token (claim times strictly increase there; under a fake clock
        two claims can share an instant, so the pairing is by token here)."""
        out = []
        seen: set[int] = set()
        for rec in sorted_records(records):
            row = self.tables.rows.get(rec.id)
            if rec.id not in seen and row is not None and row.status == "processing" \
                    and row.lease_token == rec.lease_token:
                seen.add(rec.id)
                out.append((rec, row))
        return out

    def claim(
        self, done: Sequence[Record], size: int, queues: list[str], unblock: Sequence[str],
        floors: Floors | None = None, announce: bool = False,
    ) -> tuple[list[Record], int]:
        """``claim``: complete ``done`` (fenced; a flagged cancel wins) and claim up to ``size`` records
        under one fresh lease token. The picks are made on the state before the completions, as the
        statement's snapshot: a completed record's key frees its next record from the next claim on. A flow
        step's result is written on its row, and the steps completed (or cancelled) settle their runs
        (``settled``): their children are claimable from the next claim on, and the records claimed get their
        parents' results as the snapshot saw them."""
        pg.text(*queues, *unblock)
        results = any(r.flow_run is not None for r in done)  # done_results: NULL without a flow step
        if results:
            pg.json_text(*(r.result for r in done))  # cast to jsonb[]
        s, t = self.settings, self.tables
        self.check_open()
        with t.lock:
            now = t.now()
            picked = t.pick(queues, size, now, s.key_concurrency, s.block_on_failure) if size else []
            parents = {row.id: self.flows.parents(row) for row in picked if row.flow_run_id is not None}
            finished = self._held(done)
            for rec, row in finished:
                t.move(row, "cancelled" if row.cancel_requested else "completed")
                row.finished_at = row.updated_at = now
                row.lease_expires_at = None
                row.result = rec.result if results else None
                t.drop_dedupe(row)
            self.flows.settle_rows([row for _, row in finished], now)
            token = uuid.uuid4()
            lease = now + timedelta(seconds=s.lease_seconds)
            claimed = Claimed(self._take(row, token, now, lease, parents.get(row.id)) for row in picked)
            claimed.rate_wait = t.rate_wait if size else None
        if s.notify and any(row.ordering_key is not None for _, row in finished):
            t.changed()  # a keyed completion may free its key's next record: wake idle runs
        return claimed, len(finished)

    def _take(self, row: Row, token: uuid.UUID, now: datetime, lease: datetime,
              parents: dict[str, Any] | None) -> Record:
        self.tables.move(row, "processing")
        row.claimed_by = self.settings.instance_id
        row.claimed_at = row.updated_at = now
        row.lease_expires_at = lease
        row.lease_token = token
        row.attempts += 1
        if row.dedupe_while != "active":
            self.tables.drop_dedupe(row)
        return Record(row.id, row.queue, _loads(row.payload), row.priority, row.attempts, row.max_attempts,
                      token, now, lease, row.run_at, row.created_at, row.ordering_key, row.dedupe_key,
                      row.cancel_requested, 0, row.flow_run_id, row.step, parents,
                      trace_context=row.trace_context)

    def unblock(self, keys: Iterable[str], *, announce: bool = True) -> None:
        """A no-op: the ``key_blocked`` hint is not kept (a key's next record is claimable when the rules
        allow it)."""
        self.check_open()

    def complete(self, records: Sequence[Record], unblock: Sequence[str] = (), announce: bool = False) -> int:
        return self.claim(records, 0, [], unblock)[1]

    def fail(self, records: Sequence[Record], error: BaseException | str, retryable: bool,
             policy: RetryPolicy | None = None) -> list[tuple[int, str]]:
        """``fail``: back to ``pending`` after the record's own backoff when retryable with attempts left,
        else ``failed`` (``cancelled`` when flagged); flow steps that end settle their runs. Returns (id, status
        after) of the records still held."""
        if not records:
            return []
        text = format_error(error, ERROR_TEXT_LIMIT)
        pg.text(text)
        retry = policy or self.settings.retry
        t = self.tables
        self.check_open()
        with t.lock:
            now = t.now()
            out = []
            held = self._held(records)
            for rec, row in held:
                if retryable and row.attempts < row.max_attempts and not row.cancel_requested:
                    t.move(row, "pending", now + timedelta(seconds=retry.delay_for(rec.attempts)))
                    row.finished_at = None
                else:
                    t.move(row, "cancelled" if row.cancel_requested else "failed")
                    row.finished_at = now
                    t.drop_dedupe(row)
                row.last_error = text
                row.lease_token = row.lease_expires_at = None
                row.updated_at = now
                out.append((row.id, row.status))
            self.flows.settle_rows([row for _, row in held], now)
            return out

    def release(self, records: Sequence[Record], reason: str) -> int:
        """``release``: pending again at once, the attempt not charged."""
        batch = sorted_records(records)
        if not batch:
            return 0
        pg.text(reason)
        t = self.tables
        self.check_open()
        with t.lock:
            now = t.now()
            held = self._held(batch)
            for _, row in held:
                t.move(row, "pending", min(row.run_at, now))  # its place in claim order kept, as the statement
                row.attempts = max(row.attempts - 1, 0)
                row.lease_token = row.lease_expires_at = None
                row.last_error = reason
                row.updated_at = now
        return len(held)

    def heartbeat(self, records: Sequence[Record], *, registered: bool) -> tuple[set[int], set[int]]:
        """``heartbeat``: the registry row (a dead instance revives) and the leases of held records."""
        t, s = self.tables, self.settings
        batch = sorted_records(records)
        pg.text(s.instance_id)
        self.check_open()
        with t.lock:
            now = t.now()
            row = t.instances.get(s.instance_id)
            if registered and row is not None:
                row["last_heartbeat_at"] = now
                if row["status"] == "dead":
                    row["status"], row["stopped_at"] = "running", None
            held = self._held(batch)
            lease = now + timedelta(seconds=s.lease_seconds)
            for _, r in held:
                r.lease_expires_at = lease
            return {r.id for _, r in held}, {r.id for _, r in held if r.cancel_requested}

    def notify_owed(self, *, force: bool = False) -> None:
        """``notify_owed``: nothing to send (a claim here sees every completion at once)."""

    def any_due(self, queues: list[str]) -> bool:
        """``any_due``: a pending record of ``queues`` is due (claimable or held back by its key), or a flow
        step of them waits for its parents (their completion releases it)."""
        pg.text(*queues)
        t = self.tables
        self.check_open()
        with t.lock:
            now = t.now()
            return any(t.rows[i].run_at <= now for q in queues if not t.control.is_paused(q, now)
                       for i in t.pending_ids(q)) or any(t.waiting_ids().get(q) for q in queues)

    # ------------------------------------------------------------------ recovery

    def recover(self) -> int:
        return sum(step() for step in self.recovery_steps())

    def recovery_steps(self) -> Iterator[Callable[[], int]]:
        """The registry (``mark_dead_instances``, ``prune_instances``), then ``recover_orphans`` in batches
        of ``cleanup_batch`` while they come back full."""
        yield self.registry_step
        while True:
            yield self.recover_batch
            if self._last_batch < self.settings.cleanup_batch:
                return

    def registry_step(self) -> int:
        t, s = self.tables, self.settings
        self.check_open()
        with t.lock:
            now = t.now()
            for inst in t.instances.values():
                if inst["status"] in ("running", "stopping") and \
                        inst["last_heartbeat_at"] < now - timedelta(seconds=s.dead_after):
                    inst["status"], inst["stopped_at"] = "dead", now
            holding = {t.rows[i].claimed_by for i in t.processing}
            cutoff = now - timedelta(seconds=s.instance_retention)
            for iid, inst in list(t.instances.items()):
                if inst["status"] in ("stopped", "dead") and iid not in holding and \
                        (inst["stopped_at"] or inst["last_heartbeat_at"]) < cutoff:
                    del t.instances[iid]
        return 0

    def recover_batch(self) -> int:
        """``recover_orphans``: processing records whose lease expired or whose instance is dead go back to
        ``pending`` (due at once) with attempts left, else to ``failed`` (``cancelled`` when flagged), a flow
        step's end settling its run."""
        t = self.tables
        self.check_open()
        with t.lock:
            now = t.now()
            dead = {iid for iid, inst in t.instances.items() if inst["status"] == "dead"}
            # as the statement: a dead instance's record claimed within dead_after waits (a sign of life)
            claimed_before = now - timedelta(seconds=self.settings.dead_after)
            orphans = sorted(
                (r for r in (t.rows[i] for i in t.processing)
                 if r.lease_expires_at is not None and (r.lease_expires_at < now or (
                     r.claimed_by in dead and r.claimed_at is not None and r.claimed_at < claimed_before))),
                key=lambda r: (r.lease_expires_at, r.id))[: self.settings.cleanup_batch]
            for row in orphans:
                assert row.lease_expires_at is not None
                if row.lease_expires_at < now:
                    why = f"lease of {row.claimed_by or ''} expired at {pg.timestamp_text(row.lease_expires_at)}"
                else:
                    why = f"instance {row.claimed_by or ''} was declared dead"
                row.last_error = f"{why} (attempt {row.attempts} of {row.max_attempts})"
                back = row.attempts < row.max_attempts and not row.cancel_requested
                status = "cancelled" if row.cancel_requested else "pending" if back else "failed"
                t.move(row, status, now)
                row.finished_at = None if back else now
                if not back:
                    t.drop_dedupe(row)
                row.lease_token = row.lease_expires_at = None
                row.updated_at = now
            self.flows.settle_rows(orphans, now)
            self._last_batch = len(orphans)
            return len(orphans)

    # ------------------------------------------------------------------ retention

    def purge_now(self, older_than: float, batch: int, max_batches: int | None) -> int:
        return sum(step() for step in self.purge_steps(older_than, batch, max_batches))

    def purge_steps(self, older_than: float, batch: int, max_batches: int | None) -> Iterator[Callable[[], int]]:
        """``purge`` in batches of ``batch`` (the oldest finished first) while they come back full, at most
        ``max_batches``."""
        last = [batch]

        def one() -> int:
            last[0] = self._purge_batch(older_than, batch)
            return last[0]

        rounds = 0
        while (max_batches is None or rounds < max_batches) and last[0] >= batch:
            yield one
            rounds += 1

    def _purge_batch(self, older_than: float, batch: int) -> int:
        t = self.tables
        self.check_open()
        with t.lock:
            try:
                cutoff = t.now() - timedelta(seconds=older_than)
            except (OverflowError, ValueError):  # older than any time (or NaN): nothing is, as in SQL
                return 0
            old = sorted((r for r in t.rows.values()
                          if r.finished_at is not None and r.status in FINAL_STATUSES and r.finished_at < cutoff
                          and not self.flows.unfinished_run(r)),
                         key=lambda r: (r.finished_at or cutoff, r.id))[:batch]
            for row in old:
                t.delete(row)
            return len(old)

    # ------------------------------------------------------------------ registry

    def register(self, metadata: dict[str, Any] | None) -> None:
        """``register_instance``: add (or revive) this instance as ``running``."""
        meta = json.dumps(metadata or {})  # what the real one sends: the same TypeError for a bad value
        s, t = self.settings, self.tables
        facts = self.facts.snapshot()
        pg.text(s.instance_id)
        self.check_open()
        with t.lock:
            now = t.now()
            row = t.instances.get(s.instance_id)
            if row is None:
                t.instances[s.instance_id] = {
                    "instance_id": s.instance_id, "hostname": facts["hostname"], "pid": facts["pid"],
                    "version": VERSION, "started_at": now, "last_heartbeat_at": now, "stopped_at": None,
                    "status": "running", "metadata": pg.jsonb(_loads(meta))}
            else:
                row.update(last_heartbeat_at=now, status="running", stopped_at=None, metadata=pg.jsonb(_loads(meta)))

    def set_instance_status(self, status: str) -> None:
        """``set_instance_status`` (a status outside the registry's four fails its check constraint)."""
        s, t = self.settings, self.tables
        pg.text(s.instance_id, status)
        self.check_open()
        with t.lock:
            row = t.instances.get(s.instance_id)
            if row is None:
                return
            now = t.now()
            if status not in INSTANCE_STATUSES:
                failing = [*(row[c] for c in REGISTRY_COLUMNS[:5]), now, row["stopped_at"], status, row["metadata"]]
                raise pg.check_violation("processor_instances", "ck_processor_instances_status", failing)
            row.update(status=status, last_heartbeat_at=now)
            if status in ("stopped", "dead"):
                row["stopped_at"] = now
