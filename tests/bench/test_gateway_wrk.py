"""`bench/gateway.py` reads wrk's figures from wrk's real output, whatever unit a latency is in.

The files under wrk/ are what Debian's wrk 4.1.0 printed against loopback servers that answered in
microseconds, in milliseconds, in 1.4 s, in a mix of those, with 503s and timeouts, and after 61 s.
wrk pads a one-letter unit with a space (`1.40s `), which once made a latency of a second or more NaN.
"""

from __future__ import annotations

import math
from dataclasses import astuple
from pathlib import Path

import pytest

from bench.gateway import WrkOutputError, WrkResult, latency_ms, parse_wrk

WRK = Path(__file__).parent / "wrk"


@pytest.mark.parametrize(
    ("capture", "want"),
    [
        ("us.txt", WrkResult(rps=6078.83, p50_ms=0.148, p99_ms=1.23, requests=12769, non_2xx=0, errors=0)),
        ("ms.txt", WrkResult(rps=448.46, p50_ms=4.38, p99_ms=5.57, requests=897, non_2xx=0, errors=0)),
        ("s.txt", WrkResult(rps=1.0, p50_ms=1400.0, p99_ms=1400.0, requests=4, non_2xx=0, errors=0)),
        ("mixed.txt", WrkResult(rps=36.68, p50_ms=0.43, p99_ms=1200.0, requests=147, non_2xx=0, errors=0)),
        ("errors.txt", WrkResult(rps=22.96, p50_ms=0.139, p99_ms=2.75, requests=69, non_2xx=23, errors=8)),
        ("minutes.txt", WrkResult(rps=0.02, p50_ms=61200.0, p99_ms=61200.0, requests=1, non_2xx=0, errors=0)),
    ],
)
def test_a_real_wrk_run_is_read_in_milliseconds(capture: str, want: WrkResult) -> None:
    got = parse_wrk((WRK / capture).read_text())
    assert astuple(got) == pytest.approx(astuple(want))


def test_the_one_letter_units_carry_the_space_that_used_to_hide_them() -> None:
    lines = (WRK / "s.txt").read_text().splitlines() + (WRK / "minutes.txt").read_text().splitlines()
    assert "     99%    1.40s " in lines
    assert "     99%    1.02m " in lines


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("148.00us", 0.148),
        ("  4.38ms", 4.38),
        ("1.40s ", 1400.0),
        ("1.40s", 1400.0),
        ("1.02m ", 61200.0),
        ("2.00h ", 7_200_000.0),
    ],
)
def test_every_unit_wrk_prints(text: str, ms: float) -> None:
    assert latency_ms(text) == pytest.approx(ms)


@pytest.mark.parametrize("text", ["", "nan", "1.40", "1.40 sec", "-"])
def test_anything_else_is_an_error_not_a_nan(text: str) -> None:
    with pytest.raises(WrkOutputError):
        latency_ms(text)


def test_output_without_the_latency_distribution_is_an_error() -> None:
    text = (WRK / "ms.txt").read_text()
    cut = "".join(line for line in text.splitlines(keepends=True) if "%" not in line or "Stdev" in line)
    with pytest.raises(WrkOutputError, match="latency distribution"):
        parse_wrk(cut)
    assert not math.isnan(parse_wrk(text).p99_ms)
