"""The run's own time breakdown (pipeline/timing.py): phases never overlap, and their sum with `other` is the wall time."""

from __future__ import annotations

import time

import pytest

from pipeline import timing


@pytest.fixture
def clock(monkeypatch):
    fresh = timing.Clock()
    monkeypatch.setattr(timing, "CLOCK", fresh)
    timing.mark_run_start()
    return fresh


def test_an_inner_phase_pauses_the_outer_one_and_other_takes_the_rest(clock):
    with timing.phase("data"):
        time.sleep(0.05)
        with timing.phase("eval"):
            time.sleep(0.1)
        time.sleep(0.05)
    time.sleep(0.05)  # in no phase
    timing.timed("eval")(time.sleep)(0.05)
    out = timing.breakdown()
    assert out["data"] == pytest.approx(0.10, abs=0.03) and out["eval"] == pytest.approx(0.15, abs=0.03)
    assert out["other"] == pytest.approx(0.05, abs=0.03)
    assert out["start"] > 0  # the process's life before mark_run_start
    assert list(out)[:2] == ["start", "data"] and list(out)[-1] == "other"  # the report's column order


def test_a_phase_left_by_an_exception_is_closed_and_unknown_phases_are_kept(clock):
    with pytest.raises(RuntimeError):
        with timing.phase("fit"):
            timing.CLOCK.enter("train steps")  # never left: an exception went through
            raise RuntimeError
    assert clock.stack == []
    with timing.phase("warm-up"):
        time.sleep(0.01)
    assert timing.breakdown()["warm-up"] > 0


def test_no_breakdown_outside_a_stage_run(monkeypatch):
    monkeypatch.setattr(timing, "CLOCK", timing.Clock())
    assert timing.breakdown() == {}
