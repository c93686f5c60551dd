"""The few-shot SFT calibration's ladder and search (pirl_tools/sft_calibration.py), on made-up scores."""

from __future__ import annotations

import pytest

from pirl_tools.sft_calibration import between, calibrate, sft_ladder

LADDER = sft_ladder(5, 1000, 40, 250)


def test_the_ladder_shortens_training_only_at_one_demo_and_lengthens_it_only_at_max_demos():
    assert LADDER == [(1, 250), (1, 500), (1, 1000), (2, 1000), (5, 1000), (10, 1000), (20, 1000), (40, 1000)]
    assert sft_ladder(3, 100, 3, 100) == [(1, 100), (2, 100), (3, 100)]
    assert sft_ladder(5, 1000, 40, 250, 4000)[-3:] == [(40, 1000), (40, 2000), (40, 4000)]
    assert sft_ladder(5, 1000, 40, 1000, 3999)[-2:] == [(40, 1000), (40, 2000)]


@pytest.mark.parametrize(
    "args",
    [(0, 1000, 40, 250), (50, 1000, 40, 250), (5, 1000, 40, 2000), (5, 1000, 40, 0), (5, 1000, 40, 250, 500)],
)
def test_a_bad_range_names_the_fields(args):
    with pytest.raises(ValueError, match="num_demos, max_demos, min_sft_steps, sft_steps, max_sft_steps"):
        sft_ladder(*args)


def scorer(table: dict):
    calls = []

    def score(rung):
        calls.append(rung)
        return table[rung]

    return score, calls


def test_inside_the_band_at_the_start_trains_once():
    score, calls = scorer({(5, 1000): 0.45})
    assert calibrate(score, LADDER, (5, 1000), (0.3, 0.6)) == ((5, 1000), 0.45, [(5, 1000, 0.45)])
    assert calls == [(5, 1000)]


def test_too_good_walks_down_to_fewer_demos_then_shorter_training():
    table = {(5, 1000): 1.0, (2, 1000): 0.95, (1, 1000): 0.9, (1, 500): 0.55, (1, 250): 0.2}
    score, calls = scorer(table)
    rung, success, trail = calibrate(score, LADDER, (5, 1000), (0.3, 0.6))
    assert (rung, success) == ((1, 500), 0.55) and calls == [(5, 1000), (2, 1000), (1, 1000), (1, 500)]
    assert trail[-1] == (1, 500, 0.55)


def test_too_weak_walks_up_and_stops_at_the_most_demos():
    table = {(5, 1000): 0.03, (10, 1000): 0.1, (20, 1000): 0.15, (40, 1000): 0.2}
    score, calls = scorer(table)
    assert calibrate(score, LADDER, (5, 1000), (0.3, 0.6))[:2] == ((40, 1000), 0.2)
    assert calls == [(5, 1000), (10, 1000), (20, 1000), (40, 1000)]


def test_crossing_the_band_keeps_the_rung_below_its_top():
    # from below: 5 demos 0.2, 10 demos 0.8 -> the top of the band is a rule: keep 5 demos
    score, calls = scorer({(5, 1000): 0.2, (10, 1000): 0.8})
    assert calibrate(score, LADDER, (5, 1000), (0.3, 0.6))[:2] == ((5, 1000), 0.2) and len(calls) == 2
    # from above: 5 demos 0.8, 2 demos 0.1 -> keep 2 demos
    score, calls = scorer({(5, 1000): 0.8, (2, 1000): 0.1})
    assert calibrate(score, LADDER, (5, 1000), (0.3, 0.6))[:2] == ((2, 1000), 0.1) and len(calls) == 2


def test_still_too_good_at_the_weakest_rung_is_returned_for_the_caller_to_report():
    score, calls = scorer(dict.fromkeys(LADDER, 0.9))
    assert calibrate(score, LADDER, (5, 1000), (0.3, 0.6))[:2] == ((1, 250), 0.9) and len(calls) == 5


def test_a_crossing_is_bisected_in_demo_count_when_refine_allows():
    # MetaWorld pick-place: 5 demos 0.17, 10 demos 0.61 -> 7 demos is tried and lands in the band
    score, calls = scorer({(5, 1000): 0.17, (10, 1000): 0.61, (7, 1000): 0.45})
    assert calibrate(score, LADDER, (5, 1000), (0.3, 0.6), refine=2)[:2] == ((7, 1000), 0.45)
    assert calls == [(5, 1000), (10, 1000), (7, 1000)]


def test_between_neighbouring_demo_counts_the_stronger_count_trains_shorter():
    # window-open: 2 demos 0.88, 1 demo 0.25 -> 2 demos at 500 steps (still above), then at 250 (in the band)
    table = {(5, 1000): 1.0, (2, 1000): 0.88, (1, 1000): 0.25, (2, 500): 0.7, (2, 250): 0.5}
    score, calls = scorer(table)
    assert calibrate(score, LADDER, (5, 1000), (0.3, 0.6), refine=2)[:2] == ((2, 250), 0.5)
    assert calls[3:] == [(2, 500), (2, 250)]


def test_an_exhausted_refinement_keeps_the_best_rung_at_or_below_the_top():
    table = {(5, 1000): 0.17, (10, 1000): 0.61, (7, 1000): 0.2, (8, 1000): 0.7}
    score, calls = scorer(table)
    assert calibrate(score, LADDER, (5, 1000), (0.3, 0.6), refine=2)[:2] == ((7, 1000), 0.2)
    assert calls == [(5, 1000), (10, 1000), (7, 1000), (8, 1000)]
    score, calls = scorer({(5, 1000): 0.17, (10, 1000): 0.61, (7, 1000): 0.25, (8, 1000): 0.9})
    assert calibrate(score, LADDER, (5, 1000), (0.3, 0.6), refine=1)[:2] == ((7, 1000), 0.25) and len(calls) == 3


def test_between_picks_a_rung_strictly_inside_or_none():
    assert between((5, 1000), (10, 1000)) == (7, 1000)
    assert between((1, 1000), (2, 1000)) == (2, 500)
    assert between((1, 500), (1, 1000)) == (1, 750)
    assert between((2, 250), (2, 251)) is None
    assert between((40, 1000), (40, 2000)) == (40, 1500)
    assert between((1, 100), (2, 100), min_steps=60) is None
