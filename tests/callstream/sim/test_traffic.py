"""A plan's deliveries: due on the rate's clock, signed as retell-sdk verifies, duplicated a little later."""

from __future__ import annotations

import random
import re

from retell.lib import webhook_auth

from callstream.fakecalls import CallFactory, Fleet
from callstream.sim.http1 import Target
from callstream.sim.plan import SimulationPlan
from callstream.sim.traffic import DUPLICATE_GAP, deliveries, schedule, with_duplicates

TARGET = Target.from_url("http://127.0.0.1:8000/webhook")


def test_deliveries_are_due_on_the_rate_and_stop_with_the_duration() -> None:
    plan = SimulationPlan(duration=2.0, rate=50, seed=1)
    ds = list(deliveries(plan, TARGET, "key_t"))
    assert len(ds) == 100
    assert [d.due for d in ds[:3]] == [0.0, 0.02, 0.04]
    for d in ds[:20]:
        sig = re.search(rb"\r\nx-retell-signature: (\S+)\r\n", d.request[: d.body_at])
        assert sig and webhook_auth.verify(d.body.decode(), "key_t", sig.group(1).decode())


def test_duplicates_repeat_an_event_a_few_deliveries_later() -> None:
    evs = list(schedule(CallFactory(Fleet(seed=2), seed=2), calls=50, rng=random.Random(2)))
    out = list(with_duplicates(evs, 0.2, random.Random(3)))
    assert [e for e, dup in out if not dup] == evs
    firsts = {id(e): i for i, (e, dup) in enumerate(out) if not dup}
    gaps = [i - firsts[id(e)] for i, (e, dup) in enumerate(out) if dup]
    assert gaps and all(1 <= g <= 2 * DUPLICATE_GAP for g in gaps)


def test_the_same_seed_makes_the_same_calls_and_a_fresh_plan_new_ones() -> None:
    keys = lambda plan: [d.key for d in deliveries(plan, TARGET, None)]  # noqa: E731
    assert keys(SimulationPlan(calls=5, seed=7)) == keys(SimulationPlan(calls=5, seed=7))
    assert not set(keys(SimulationPlan(calls=5))) & set(keys(SimulationPlan(calls=5)))
