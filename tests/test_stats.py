"""integrations.llm.stats and the report's seed table: known small cases computed by hand, no model."""

import re

import pytest
from tying.integrations.llm import stats


def test_mean_std_by_hand():
    assert stats.mean_std([30.0, 40.0, 50.0]) == (40.0, 10.0)  # sample std: sqrt((100 + 0 + 100) / 2)
    assert stats.mean_std([42.0]) == (42.0, 0.0)


def test_percentile_interpolates_like_numpy():
    assert stats.percentile([0.0, 10.0, 20.0, 30.0, 40.0], 0.5) == 20.0
    assert stats.percentile([0.0, 10.0], 0.25) == 2.5


def test_bootstrap_of_a_constant_difference_has_no_width():
    d, lo, hi = stats.paired_bootstrap([[100.0, 100.0, 0.0]], [[0.0, 0.0, -100.0]], n_boot=200)
    assert (d, lo, hi) == (100.0, 100.0, 100.0)


def test_bootstrap_of_two_examples_by_hand():
    """Differences 0 and 100: a resample of 2 examples has mean 0, 50 or 100 with probabilities 1/4, 1/2, 1/4,
    so the 95 % interval is [0, 100] and the mean 50."""
    d, lo, hi = stats.paired_bootstrap([[100.0, 100.0]], [[100.0, 0.0]], n_boot=4000)
    assert (d, lo, hi) == (50.0, 0.0, 100.0)


def test_bootstrap_pairs_by_seed_and_example():
    """Seed 0 wins on example 0 and seed 1 on example 1: averaged over seeds, every example differs by 50, so the
    paired interval is [50, 50] (resampling seeds and examples independently would not give that)."""
    assert stats.paired_bootstrap([[100.0, 0.0], [0.0, 100.0]], [[0.0, 0.0], [0.0, 0.0]], n_boot=300) == (50.0, 50.0, 50.0)


def test_bootstrap_refuses_unpaired_input():
    with pytest.raises(ValueError, match="same seeds and the same test examples"):
        stats.paired_bootstrap([[1.0, 2.0]], [[1.0]])
    with pytest.raises(ValueError, match="same seeds"):
        stats.paired_bootstrap([[1.0], [2.0]], [[1.0]])


@pytest.mark.parametrize("lo, hi, margin, want", [(0.5, 3.0, 0.0, "supported"), (-3.0, -0.5, 0.0, "refuted"),
                                                   (-1.0, 2.0, 0.0, "undecided at this scale"),
                                                   (-1.0, 2.0, 2.0, "supported"), (-6.0, -3.0, 2.0, "refuted")])
def test_verdict(lo, hi, margin, want):
    assert stats.verdict(lo, hi, margin) == want


def test_seed_table_aggregates_parts(monkeypatch):
    pytest.importorskip("transformers")
    from tying.integrations.llm import report

    def part(config, seed, per):
        return {"task": "nli", "config": config, "rank": 8, "seed": seed, "metrics": {"per_example": per}}

    rows = [part("lora", 0, [100.0, 0.0]), part("lora", 1, [0.0, 0.0]),
            part("tl6", 0, [100.0, 100.0]), part("tl6", 1, [100.0, 100.0]),
            part("vera", 0, [100.0, 0.0]), {"task": "nli", "config": "tl5", "rank": 8, "seed": 0, "metrics": {}}]
    table = "\n".join(report.seed_table(rows))
    # lora: seed means 50 and 0 -> 25 ± 35.4; tl6 - lora per example over seeds: (0 + 100) / 2 = 50, (100 + 100) / 2 = 100
    assert "| nli | lora | 8 | 2 | 25.0 ± 35.4 | — | — | — |" in table
    assert "| nli | tl6 | 8 | 2 | 100.0 ± 0.0 | +75.0 [+50.0, +100.0] | supported | supported |" in table
    # a difference of exactly 0: not above 0, but above -10 % of LoRA's 25.0
    assert "| nli | vera | 8 | 1 | 50.0 ± 0.0 | +0.0 [+0.0, +0.0] | undecided at this scale | supported |" in table
    assert "tl5" not in table  # no per-example scores: left out, not guessed
    assert report.seed_table([rows[-1]]) == []


def test_seed_table_pairs_and_ranks():
    pytest.importorskip("transformers")
    from tying.integrations.llm import report
    part = lambda config, rank, per: {"task": "squad", "config": config, "rank": rank, "seed": 0,
                                      "metrics": {"per_example": per}}
    rows = [part("lora", 8, [0.0, 0.0, 100.0, 100.0]), part("tl5", 8, [0.0, 100.0, 100.0, 100.0]),
            part("tl6", 8, [0.0, 0.0, 0.0, 100.0]), part("tl6", 64, [100.0, 100.0, 100.0, 100.0])]
    table = "\n".join(report.seed_table(rows))
    # tl6 - tl5 per example: 0, -100, -100, 0 -> mean -50; a resample's mean lies between -100 and 0
    line = next(x for x in table.splitlines() if x.startswith("| squad | tl6 r8 | tl5 r8 |"))
    d, lo, hi = map(float, re.findall(r"[-+]\d+\.\d", line))
    assert d == -50.0 and -100.0 <= lo < d < hi <= 0.0
    # across ranks: tl6 r64 - tl6 r8 = +75 (three of four examples gained)
    assert "| squad | tl6 r64 | tl6 r8 | +75.0 [" in table
    assert "vera" not in table  # a pair with a config that did not run is left out
