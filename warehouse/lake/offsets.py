"""Kafka offsets in Iceberg snapshot summaries, as the Kafka Connect Iceberg sink keeps them.

A sink's commit puts, in the summary of each table's new snapshot, the next offset of every partition
the commit covers (`callstream.offset.<topic>.<partition>`), and only those: two sinks that share a
topic each carry their own partitions, so a commit retried on top of another sink's never moves the
other's offsets. A sink resumes a partition from the highest offset any snapshot of the family's
parent table holds for it. `lake maintain` writes a checkpoint snapshot that carries every
partition's offset before it expires older snapshots, so expiry loses none.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from pyiceberg.table.metadata import TableMetadata

PREFIX = "callstream.offset."
COMMIT_ID = "callstream.commit-id"
WRITER = "callstream.writer"

Offsets = dict[tuple[str, int], int]


def to_summary(offsets: Mapping[tuple[str, int], int]) -> dict[str, str]:
    return {f"{PREFIX}{t}.{p}": str(o) for (t, p), o in offsets.items()}


def from_summary(summary: Mapping[str, object]) -> Offsets:
    out: Offsets = {}
    for key, value in summary.items():
        if isinstance(key, str) and key.startswith(PREFIX):
            topic, _, partition = key.removeprefix(PREFIX).rpartition(".")
            out[(topic, int(partition))] = int(str(value))
    return out


def merge(into: Offsets, more: Mapping[tuple[str, int], int]) -> Offsets:
    """The higher offset per partition (a partition's offsets only grow)."""
    for tp, o in more.items():
        if o > into.get(tp, -1):
            into[tp] = o
    return into


def stored(metadata: TableMetadata, topics: Iterable[str] | None = None) -> Offsets:
    """The next offset of every partition that any snapshot of the table carries."""
    out: Offsets = {}
    for snap in metadata.snapshots:
        if snap.summary is not None:
            merge(out, from_summary(snap.summary.additional_properties))
    if topics is not None:
        wanted = set(topics)
        out = {tp: o for tp, o in out.items() if tp[0] in wanted}
    return out
