from __future__ import annotations

import pytest

from pipelines.execute import steady_rate


def _completions(slots: int, unit_s: float, units: int, start_s: float, stagger_s: float = 0.0) -> list:
    """A pipeline of `slots` parallel workers, each taking `unit_s` per 100-row unit: 100 * slots / unit_s
    rows/s once running, after `start_s` of start-up."""
    times = sorted(
        start_s + j * stagger_s + (k + 1) * unit_s for j in range(slots) for k in range(units // slots)
    )
    return [(t, 100 * (i + 1)) for i, t in enumerate(times)]


@pytest.mark.parametrize("stagger_s", [0.0, 1.0])
def test_steady_rate_is_the_running_rate_whatever_the_start_up(stagger_s) -> None:
    # Three units in flight, all started together (they land in bursts) or staggered: 100 rows/s either way.
    completions = _completions(slots=3, unit_s=3.0, units=12, start_s=10.0, stagger_s=stagger_s)
    assert steady_rate(completions) == pytest.approx(100.0)
    if stagger_s == 0.0:
        # What a first-to-last rate says: the rows in flight at the first shard counted as made after it.
        (t0, r0), (t1, r1) = completions[0], completions[-1]
        assert (r1 - r0) / (t1 - t0) == pytest.approx(122.2, abs=0.1)


def test_steady_rate_needs_three_completions_at_distinct_times() -> None:
    assert steady_rate([(1.0, 100), (2.0, 200)]) is None
    assert steady_rate([(1.0, 100), (1.0, 200), (1.0, 300)]) is None
    assert steady_rate([(1.0, 100), (2.0, 200), (3.0, 300)]) == pytest.approx(100.0)
