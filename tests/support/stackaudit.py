"""The audit of a whole stack after a run, each check named with what it found: every acknowledged
event on its topic, the workers' exact totals, the warehouse against the topics, Parquet against
DuckDB, and each alert once on its topic and once at the receiver.

What is owed comes from the topics (`tests.support.expected`): only 204s count as sent, and an
event answered 503 may still be stored (a late acknowledgement), so the topics, checked to hold
every 204, are the measure.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from callstream.sim.record import Acknowledged
from tests.support.audit import assert_parquet_equals_duckdb, database_problems, restart_state, stored_offsets
from tests.support.expected import AlertLog, Stored


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _some(items: Iterable[Any], n: int = 5) -> str:
    items = list(items)
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(map(str, items[:n])) + more


def _found(label: str, items: Iterable[Any]) -> str:
    items = list(items)
    return f"; {label}: {len(items)} ({_some(items)})" if items else ""


def acknowledged_on_topics(acked: int, missing: list[Acknowledged]) -> Check:
    """`missing`: the acknowledged deliveries whose body is on no topic."""
    if missing:
        shown = _some(f"{a.event} {a.key}" for a in missing)
        return Check("every 204 on its topic", False, f"{len(missing)} of {acked} acknowledged bodies missing: {shown}")
    return Check("every 204 on its topic", True, f"{acked:,} acknowledged deliveries, each body on its topic")


def worker_totals(counts: dict[str, Any] | None, metrics: dict[str, Any] | None, stored: Stored) -> list[Check]:
    """The group's `/api/counts` and `/api/metrics` against what the topics hold, by the worker's rules."""
    want = stored.worker_counts()
    if counts is None or metrics is None:
        return [Check("worker totals", False, "the workers did not answer")]
    got = {k: int(v) for k, v in counts.get("events", {}).items()}
    diff = {e: (got.get(e, 0), want.get(e, 0)) for e in sorted(set(got) | set(want)) if got.get(e, 0) != want.get(e, 0)}
    total = sum(want.values())
    checks = [
        Check(
            "worker totals = distinct events stored",
            not diff and bool(counts.get("complete")),
            f"{total:,} distinct events over {len(want)} types, equal"
            if not diff and counts.get("complete")
            else f"(worker, topics) differ: {diff}; complete: {counts.get('complete')}",
        )
    ]
    calls = int(metrics["overall"]["calls"])
    checks.append(
        Check(
            "worker: distinct calls",
            calls == len(stored.calls),
            f"{calls:,} calls counted, {len(stored.calls):,} on the topics",
        )
    )
    return checks


def warehouse(db: Path, parquet: Path, stored: Stored) -> list[Check]:
    """One row per analyzed call and chat from its last delivery, exact child rows, every offset
    loaded, nothing dead-lettered, and Parquet equal to DuckDB."""
    offsets = stored_offsets(db)
    if offsets is None:
        return [Check("warehouse", False, f"{db} has no loads")]
    view, offsets, strict = restart_state(db, {})
    problems = database_problems(view, offsets, stored.last_deliveries, strict)
    ends = {tp: end for tp, end in stored.ends.items() if tp[0].endswith(("call_analyzed", "chat_analyzed"))}
    if {tp: offsets.get(tp, 0) for tp in ends} != ends:
        problems.append(f"loaded up to {offsets}, the topics end at {ends}")
    if stored.dead_letters:
        problems.append(f"{stored.dead_letters} dead letters")
    checks = [Check("DuckDB: one row per analyzed call and chat, exactly once", not problems, "; ".join(problems))]
    with duckdb.connect(str(view), read_only=True) as con:
        got = {
            t: int(con.execute(f"SELECT count(*) FROM {t}").fetchone()[0])  # type: ignore[index]
            for t in ("calls", "chats", "call_utterances", "call_tool_calls", "chat_messages")
        }
    kids = stored.child_rows()
    want = {
        "calls": len(stored.lifecycle["call_analyzed"]),
        "chats": len(stored.lifecycle["chat_analyzed"]),
        "call_utterances": kids.utterances,
        "call_tool_calls": kids.tool_calls,
        "chat_messages": kids.messages,
    }
    if not problems:
        checks[0].detail = f"{want['calls']:,} calls and {want['chats']:,} chats, every offset loaded"
    checks.append(
        Check(
            "DuckDB: exact child rows",
            got == want,
            ", ".join(f"{t} {got[t]:,}" + ("" if got[t] == want[t] else f" (want {want[t]:,})") for t in want),
        )
    )
    try:
        counts = assert_parquet_equals_duckdb(view, parquet)
        checks.append(Check("Parquet = DuckDB", True, f"{sum(counts.values()):,} rows in {len(counts)} tables"))
    except AssertionError as exc:
        checks.append(Check("Parquet = DuckDB", False, str(exc)))
    return checks


def alert_id(body: dict[str, Any]) -> str:
    """The alert id of a Slack-compatible body (`{"text": ..., "alert": {...}}`)."""
    return str(body.get("alert", {}).get("id"))


# How long before a worker's SIGKILL a POST may have arrived for the worker that takes over its outbox
# to post that alert again: the moment between the webhook's answer and the tombstone of the outbox
# entry reaching Kafka (streams/outbox.py), with room for a loaded machine.
REPOST_WINDOW_S = 5.0


def reposted_at_a_kill(times: list[float], kills: Sequence[float]) -> float | None:
    """The worker SIGKILL that explains an alert arriving at `times`, or None: arrived exactly twice,
    the first within REPOST_WINDOW_S before that kill and the second after it."""
    if len(times) != 2:
        return None
    first, second = sorted(times)
    return next((k for k in kills if k - REPOST_WINDOW_S <= first <= k < second), None)


def alerts_once(
    log: AlertLog,
    deliveries: list[tuple[float, Any]],
    owed: set[str],
    throttle_minutes: float,
    kills: Sequence[float] = (),
) -> list[Check]:
    """Each alert once on the topic and once at the receiver, the per-call alerts exactly those owed,
    and no agent's failure-rate alert again within its throttle.

    `deliveries` are (arrival time, body); `kills` the wall-clock times of worker SIGKILLs. An alert
    posted a second time by the worker that took over a killed worker's outbox, because the killed
    one was answered in the moment before it died (REPOST_WINDOW_S), is the one repost a webhook can
    see (with the same Idempotency-Key): it is reported, not failed. Any other second delivery fails.
    """
    times: dict[str, list[float]] = defaultdict(list)
    for at, body in deliveries:
        times[alert_id(body)].append(at)
    got = Counter({i: len(ts) for i, ts in times.items()})
    on_topic_twice = {i: n for i, n in log.ids.items() if n > 1}
    reposts = {i: k for i, ts in times.items() if len(ts) > 1 and (k := reposted_at_a_kill(ts, kills)) is not None}
    received_twice = {i: n for i, n in got.items() if n > 1 and i not in reposts}
    not_received = set(log.ids) - set(got)
    not_on_topic = set(got) - set(log.ids)
    checks = [
        Check(
            "each alert once on the alerts topic",
            not on_topic_twice,
            f"{len(log.ids):,} alerts"
            if not on_topic_twice
            else f"{len(on_topic_twice)} twice or more: {_some(on_topic_twice.items())}",
        ),
        Check(
            "each alert delivered once to the webhook",
            not received_twice and not not_received and not not_on_topic,
            f"{sum(got.values()):,} deliveries of {len(got):,} alerts"
            + _found("delivered more than once", received_twice.items())
            + _found(
                "posted again by the worker that took over a SIGKILLed worker's outbox (answered in the moment "
                f"before the kill, within {REPOST_WINDOW_S:g} s; same Idempotency-Key)",
                sorted(reposts),
            )
            + _found("on the topic, never delivered", sorted(not_received))
            + _found("delivered, not on the topic", sorted(not_on_topic)),
        ),
    ]
    missing, extra = owed - log.per_call, log.per_call - owed
    checks.append(
        Check(
            "per-call alerts = those the stored events owe",
            not missing and not extra,
            f"{len(owed):,} owed" + _found("never raised", sorted(missing)) + _found("raised, not owed", sorted(extra)),
        )
    )
    by_agent: dict[str, list[int]] = defaultdict(list)
    for agent, at in log.rate:
        by_agent[agent].append(at)
    close = [
        f"{agent} at {a} and {b}"
        for agent, ats in by_agent.items()
        for a, b in zip(sorted(ats), sorted(ats)[1:], strict=False)
        if b - a < throttle_minutes * 60_000
    ]
    checks.append(
        Check(
            "failure-rate alerts throttled",
            not close,
            f"{len(log.rate)} failure-rate alerts" + (f"; within the throttle: {_some(close)}" if close else ""),
        )
    )
    return checks
