"""The reporting views: callers counted per day and agent, the same whether numbers are kept or
hashed, and no view ever shows a phone number."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from callstream.fakecalls import CallFactory, Fleet
from tests.support.warehouse import build
from warehouse.personal_data import KEEP_ALL, PersonalData
from warehouse.read import connect
from warehouse.views import VIEWS

DAY_MS = 86_400_000


@pytest.fixture
def calls() -> list[dict[str, Any]]:
    """Three callers on two days: one calls three times on day one, one calls on both days; plus an
    outbound call (the person is the called number) and a web call (no number)."""
    f = CallFactory(Fleet(seed=71, agents=1), seed=71, turns=(2, 3))
    day1, day2 = 1_790_000_000_000, 1_790_000_000_000 + DAY_MS

    def call(at: int, scenario: str = "completed", **kw: Any) -> dict[str, Any]:
        return f.events(scenario, now_ms=at, **kw)[-1].payload

    a, b, c = "+14155550101", "+14155550102", "+14155550103"
    return [
        *(call(day1 + i * 60_000, direction="inbound", from_number=a) for i in range(3)),
        call(day1, direction="inbound", from_number=b),
        call(day2, direction="inbound", from_number=b),
        call(day2, direction="outbound", to_number=c, from_number="+18005550000"),
        call(day2, "web_call"),
    ]


def _callers(tmp_path: Path, calls: list[dict[str, Any]], personal: PersonalData) -> list[tuple[Any, ...]]:
    build(tmp_path / "w.duckdb", tmp_path / "parquet", [calls], personal)
    return (
        connect(tmp_path / "parquet")
        .execute("SELECT day, callers, repeat_callers, calls_with_number FROM daily_callers ORDER BY day")
        .fetchall()
    )


def test_daily_callers_counts_people_the_same_kept_or_hashed(calls, tmp_path):
    kept = _callers(tmp_path / "kept", calls, KEEP_ALL)
    assert [r[1:] for r in kept] == [(2, 1, 4), (2, 0, 2)]
    hashed = _callers(tmp_path / "hashed", calls, PersonalData(phone_numbers="hash", key=b"views-key-0123456789"))
    assert hashed == kept


def test_no_view_shows_a_phone_number(calls, tmp_path):
    build(tmp_path / "w.duckdb", tmp_path / "parquet", [calls])
    numbers = {c["call"][k] for c in calls for k in ("from_number", "to_number") if c["call"].get(k)}
    con = connect(tmp_path / "parquet")
    assert con.execute("SELECT count(DISTINCT from_number) FROM calls").fetchall()[0][0] >= 3  # the table has them
    for name in VIEWS:
        rel = con.execute(f"SELECT * FROM {name}")
        columns = [d[0] for d in rel.description]
        text = orjson.dumps(rel.fetchall(), default=str).decode()
        assert not [n for n in numbers if n in text or n[-10:] in text], name
        assert not [c for c in columns if "number" in c and c != "calls_with_number"], name
