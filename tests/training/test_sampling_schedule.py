"""Sample grids never stall the other ranks: intermediate grids only with one worker (training.loop)."""

from __future__ import annotations

from training.loop import intermediate_sampling


def test_one_worker_keeps_its_schedule() -> None:
    assert intermediate_sampling(100, 1) == (100, None)
    assert intermediate_sampling(0, 1) == (0, None)
    assert intermediate_sampling(0, 4) == (0, None)  # nothing asked, nothing said


def test_several_workers_skip_intermediate_grids_and_say_why() -> None:
    every, reason = intermediate_sampling(2000, 4)
    assert every == 0
    assert reason is not None and "tracking.sample_every=2000 skipped" in reason and "4 workers" in reason
    assert "after the last step" in reason
