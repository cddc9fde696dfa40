"""Routing over shards: a key's partition (a stable hash), the partition map, how a batch is split.

A record with an ordering key, or else a dedupe key, lives on the shard its key's partition maps to, so
per-key FIFO, key limits and dedupe stay one database's business. Keyless records go where there is room.
The map (``shard_map``, a copy on every shard) says which shard owns each of :data:`PARTITIONS` partitions;
the copy with the highest version of a partition wins. See docs/scale-out.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.backend import CountRow, NewRecords

# Fixed for the life of a deployment: a key's partition never changes, only the partition's shard.
PARTITIONS = 64
# The most shards there may be: ids of shard n are n modulo this (dp_set_shard_ids), unique across shards.
MAX_SHARDS = 16


def partition_of(key: str) -> int:
    """The partition of a routing key: the same in every process, every Python version and every run, and in
    SQL (``dp_partition_of``: byte 7 of the key's SHA-256, whose low 6 bits pick one of 64)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[7] % PARTITIONS


def routing_key(ordering_key: str | None, dedupe_key: str | None) -> str | None:
    return ordering_key if ordering_key is not None else dedupe_key


@dataclass
class ShardMap:
    """Which shard owns each partition (``owner[p]``), the version of each entry, and the partitions moving."""

    owner: list[int]
    version: list[int]
    moving: list[bool]

    @classmethod
    def merge(cls, copies: Iterable[Sequence[tuple[int, int, int, bool]]]) -> ShardMap:
        """The map from the copies read off the shards (rows of partition, shard, version, moving)."""
        owner, version, moving = [-1] * PARTITIONS, [0] * PARTITIONS, [False] * PARTITIONS
        for rows in copies:
            for p, shard, ver, mov in rows:
                if 0 <= p < PARTITIONS and ver > version[p]:
                    owner[p], version[p], moving[p] = int(shard), int(ver), bool(mov)
        return cls(owner, version, moving)

    @property
    def complete(self) -> bool:
        return all(o >= 0 for o in self.owner)

    def partitions_of(self, shard: int) -> list[int]:
        return [p for p, o in enumerate(self.owner) if o == shard]


@dataclass
class Split:
    """Where each record of a batch goes: ``parts[shard]`` lists input indexes; ``partitions[shard]`` the
    partitions those records were routed by (checked by the shard inside the insert)."""

    parts: dict[int, list[int]] = field(default_factory=dict)
    partitions: dict[int, set[int]] = field(default_factory=dict)
    keyless: list[int] = field(default_factory=list)


def split_batch(keys: Sequence[str | None], dedupes: Sequence[str | None], shard_map: ShardMap) -> Split:
    """Route a batch: keyed records to their partition's shard; keyless ones are listed apart (they go
    where there is room, chosen by the caller)."""
    out = Split()
    for i, (k, d) in enumerate(zip(keys, dedupes, strict=True)):
        rk = routing_key(k, d)
        if rk is None:
            out.keyless.append(i)
            continue
        p = partition_of(rk)
        shard = shard_map.owner[p]
        out.parts.setdefault(shard, []).append(i)
        out.partitions.setdefault(shard, set()).add(p)
    return out


def rebalanced(owner: Sequence[int], shards: Sequence[int]) -> dict[int, int]:
    """Partitions to move so that ``shards`` share them evenly (moving as few as possible): {partition: new
    owner}. A partition of a shard not in ``shards`` (being retired) always moves."""
    if not shards:
        raise ValueError("no shard to own the partitions")
    target = {s: len(owner) // len(shards) + (1 if i < len(owner) % len(shards) else 0)
              for i, s in enumerate(sorted(shards))}
    held: dict[int, list[int]] = {s: [] for s in target}
    loose: list[int] = []
    for p, o in enumerate(owner):
        if o in held and len(held[o]) < target[o]:
            held[o].append(p)
        else:
            loose.append(p)
    moves: dict[int, int] = {}
    for s in sorted(target):
        while len(held[s]) < target[s] and loose:
            p = loose.pop(0)
            held[s].append(p)
            if owner[p] != s:
                moves[p] = s
    return moves


def subset(batch: NewRecords, idx: list[int]) -> NewRecords:
    """The records ``idx`` of a batch, as a batch of their own."""
    return NewRecords(
        payloads=[batch.payloads[i] for i in idx], queue=batch.queue, priority=batch.priority, run_at=batch.run_at,
        max_attempts=batch.max_attempts, keys=[batch.keys[i] for i in idx], dedupes=[batch.dedupes[i] for i in idx],
        dedupe_while=batch.dedupe_while, trace=batch.trace,
    )


def merge_counts(parts: Iterable[list[CountRow]]) -> list[CountRow]:
    """Counts of several shards as one: summed per queue and status, the oldest pending age the oldest."""
    merged: dict[tuple[str, str], list[Any]] = {}
    for rows in parts:
        for queue, status, n, age, due in rows:
            m = merged.setdefault((queue, status), [queue, status, 0, None, 0])
            m[2] += n
            m[4] += due
            if age is not None and (m[3] is None or age > m[3]):
                m[3] = age
    return [(q, s, n, a, d) for q, s, n, a, d in merged.values()]
