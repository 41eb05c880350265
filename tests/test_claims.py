import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ge_utils.claims import (
    ClaimReport,
    Estimate,
    bootstrap_interval,
    clustered_share,
    every,
    mean_interval,
    paired_difference,
    parse_verdicts,
    proportion_interval,
    share_interval,
    verdict_of,
)
from ge_utils.predict import skill_table


def test_mean_interval_is_scipys_t_interval():
    x = np.array([-1.2, -0.4, -2.3, 0.1, -0.9, -1.7])
    est = mean_interval(x)
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    assert est.effect == pytest.approx(x.mean())
    assert (est.low, est.high) == pytest.approx((x.mean() - half, x.mean() + half))
    assert est.n == 6


def test_proportion_interval_is_clopper_pearson():
    est = proportion_interval(7, 20)
    # Clopper-Pearson from the beta quantiles
    low = stats.beta.ppf(0.025, 7, 20 - 7 + 1)
    high = stats.beta.ppf(0.975, 7 + 1, 20 - 7)
    assert (est.low, est.high) == pytest.approx((low, high))
    assert proportion_interval(0, 5).low == 0.0 and proportion_interval(5, 5).high == 1.0
    with pytest.raises(ValueError):
        proportion_interval(3, 2)


def test_paired_difference_and_bootstrap():
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.5, 1.0, 2.0, 3.5])
    assert paired_difference(a, b) == mean_interval(a - b)
    with pytest.raises(ValueError, match="against"):
        paired_difference(a, b[:3])
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = x + rng.normal(scale=0.5, size=200)
    est = bootstrap_interval((x, y), lambda u, v: stats.spearmanr(u, v).statistic, n_resamples=300)
    assert est.low <= est.effect <= est.high and 0.7 < est.low


def test_bootstrap_where_bca_is_undefined():
    """No single point moves this median (every leave-one-out median is 0: BCa's acceleration
    is 0/0), yet resamples with four or more ones move it: the interval is scipy's percentile
    interval of the same resamples, not a zero-width one. Equal resamples give zero width; a
    statistic that is NaN on a resample leaves the interval unbounded."""
    x = np.array([0.0, 0, 0, 0, 0, 1, 1, 1])
    est = bootstrap_interval((x,), np.median)
    with pytest.warns(RuntimeWarning):
        bca = stats.bootstrap((x,), np.median, method="BCa", vectorized=False,
                              rng=np.random.default_rng(0)).confidence_interval  # fmt: skip
    assert np.isnan(bca.low)
    pct = stats.bootstrap((x,), np.median, method="percentile", vectorized=False,
                          rng=np.random.default_rng(0)).confidence_interval  # fmt: skip
    assert (est.effect, est.low, est.high) == (0.0, pct.low, pct.high) and est.high == 1.0
    same = bootstrap_interval((np.ones(6),), np.mean)
    assert (same.low, same.high) == (1.0, 1.0)
    undefined = bootstrap_interval((x,), lambda a: np.nan if a.sum() > 3 else a.mean())
    assert (undefined.low, undefined.high) == (-math.inf, math.inf)
    assert verdict_of(undefined, ">") == "inconclusive"


def test_single_value_and_bad_values():
    assert verdict_of(mean_interval([3.0]), ">") == "inconclusive"
    with pytest.raises(ValueError, match="non-finite"):
        mean_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="no values"):
        mean_interval([])
    with pytest.raises(ValueError, match="ordered"):
        Estimate(0.0, 1.0, -1.0, 2)


def test_three_valued_verdicts_on_synthetic_claims():
    rng = np.random.default_rng(1)
    zero = rng.normal(0.0, 1.0, size=40)
    strong = rng.normal(-3.0, 1.0, size=40)
    report = ClaimReport()
    assert report.takeaway("no effect", zero - zero.mean(), "<", over="40 pairs") == "inconclusive"
    assert report.takeaway("chosen falls", strong, "<", over="40 pairs") == "holds"
    assert report.takeaway("chosen rises", strong, ">", over="40 pairs") == "does not hold"
    assert report.takeaway_proportion("most pairs", np.arange(40) < 30, over="40 pairs") == "holds"
    assert [c.verdict for c in report.claims] == [
        "inconclusive", "holds", "does not hold", "holds"
    ]


def test_report_round_trips_through_text():
    report = ClaimReport()
    report.takeaway("chosen falls", [-1.5, -2.0, -0.5], "<", over="3 pairs x 1 seed", unit="nats",
                    poster="chosen-falls")
    report.guarantee("case 1 after one step", True, conditions="head, SGD", evidence="12/12")
    report.consistency("margin grows to first order", False, evidence="79/80 pair-steps")
    report.takeaway("one seed", [2.0], ">", over="1 seed")
    parsed = parse_verdicts("noise\n" + str(report) + "\nmore noise")
    records = report.to_records()
    assert len(parsed) == 4
    for p, r in zip(parsed, records, strict=True):
        assert {k: p[k] for k in KEYS} == {k: r[k] for k in KEYS
        }
        if r["effect"] is None:
            assert p["effect"] is None and p["interval"] is None
        else:
            assert p["effect"] == pytest.approx(r["effect"], rel=1e-3)
            assert p["interval"] == pytest.approx(r["interval"], rel=1e-3)
    assert parsed[3]["interval"] == [-math.inf, math.inf]


KEYS = ("kind", "verdict", "claim", "over", "evidence", "unit", "poster")


def test_report_rejects_bad_input():
    report = ClaimReport()
    with pytest.raises(ValueError, match="over"):
        report.takeaway("x", [1.0, 2.0], ">")
    with pytest.raises(ValueError, match="expect"):
        report.takeaway("x", [1.0, 2.0], "=", over="2 pairs")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="conditions"):
        report.guarantee("x", True, conditions="", evidence="1")
    with pytest.raises(ValueError, match="unknown poster"):
        report.takeaway("x", [1.0, 2.0], ">", over="2 pairs", poster="chosen")
    with pytest.raises(ValueError, match="'\\|'"):
        report.consistency("x", True, evidence="a | b")


def test_a_check_with_no_case_is_inconclusive_not_held():
    """``every(k, n)``: all n cases passed, or None when there was none; a guarantee or
    consistency line given None reads inconclusive (a check that checked nothing cannot hold),
    and round-trips through the text."""
    assert every(3, 3) is True and every(2, 3) is False and every(0, 0) is None
    for bad in ((4, 3), (-1, 3)):
        with pytest.raises(ValueError, match="not a count"):
            every(*bad)
    report = ClaimReport()
    assert report.consistency("margin grows", every(0, 0), "0/0 pair-steps") == "inconclusive"
    assert report.guarantee("case 1", every(0, 0), conditions="head", evidence="0/0") == (
        "inconclusive")
    assert report.consistency("margin grows", every(5, 5), "5/5 pair-steps") == "holds"
    assert report.guarantee("case 1", every(4, 5), conditions="head", evidence="4/5") == (
        "does not hold")
    parsed = parse_verdicts(str(report))
    assert [p["verdict"] for p in parsed] == ["inconclusive", "inconclusive", "holds",
                                              "does not hold"]


def test_undefined_effect_is_inconclusive_without_numbers():
    report = ClaimReport()
    nan = float("nan")
    verdict = report.takeaway_estimate("AUROC above chance", Estimate(nan, nan, nan, 12), ">",
                                       0.5, over="12 pairs")
    assert verdict == "inconclusive"
    parsed = parse_verdicts(str(report))[0]
    assert parsed["effect"] is None and parsed["interval"] is None
    assert parsed["evidence"].startswith("effect undefined in this run")


def seeded(
    means: list[float], spread: float, n: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` values around each of ``means`` (one per seed), and their seed labels."""
    rng = np.random.default_rng(seed)
    values = np.concatenate([m + spread * rng.standard_normal(n) for m in means])
    return values, np.repeat(np.arange(len(means)), n)


def test_seed_level_interval_is_the_random_effects_interval_of_a_balanced_design():
    """Pairs nested in 3 runs that differ: the interval is the mean +- t(2) sqrt(MS_between /
    (n S)) of the one-way random-effects ANOVA, computed here by hand, wider than the pooled
    t-interval that counts all 48 values as independent."""
    values, seeds = seeded([-10.0, -2.0, -2.5], 1.0, 16)
    est = mean_interval(values, seeds)
    pooled = mean_interval(values)
    means = values.reshape(3, 16).mean(axis=1)
    ms_between = 16 * ((means - values.mean()) ** 2).sum() / 2
    half = stats.t.ppf(0.975, 2) * math.sqrt(ms_between / 48)
    assert est.effect == pytest.approx(values.mean())
    assert (est.low, est.high) == pytest.approx((values.mean() - half, values.mean() + half))
    assert est.low < pooled.low and pooled.high < est.high
    assert (est.n, est.seeds, pooled.seeds) == (48, 3, 1)
    assert est.detail.startswith("seed means -10")
    assert verdict_of(pooled, "<") == "holds" and verdict_of(est, "<") == "inconclusive"
    assert paired_difference(values, np.zeros(48), seeds) == est


def test_seed_level_interval_covers_the_pooled_one_and_ignores_a_single_seed():
    values = np.tile(1.0 + 2.0 * np.random.default_rng(3).standard_normal(10), 3)  # equal means
    seeds = np.repeat(np.arange(3), 10)
    est, pooled = mean_interval(values, seeds), mean_interval(values)
    assert (est.low, est.high) == pytest.approx((pooled.low, pooled.high))
    assert est.seeds == 3
    assert mean_interval(values, np.zeros(30)) == pooled
    with pytest.raises(ValueError, match="30 values but 29 seed labels"):
        mean_interval(values, seeds[:-1])
    with pytest.raises(ValueError, match="1 seed labels are NaN"):
        mean_interval(values, np.r_[np.nan, np.zeros(29)])


def test_seed_level_interval_keeps_its_coverage_where_runs_differ():
    """Simulated runs with a run effect as large as the pair noise (3 seeds x 16 pairs, true
    mean 0): the pooled interval misses the mean far more often than 5% of the time, the
    seed-level one about 5% of the time or less."""
    rng = np.random.default_rng(7)
    missed_pooled = missed_seed = 0
    reps = 400
    seeds = np.repeat(np.arange(3), 16)
    for _ in range(reps):
        values = rng.standard_normal(3).repeat(16) + rng.standard_normal(48)
        pooled, est = mean_interval(values), mean_interval(values, seeds)
        missed_pooled += not pooled.low <= 0.0 <= pooled.high
        missed_seed += not est.low <= 0.0 <= est.high
    assert missed_pooled / reps > 0.3
    assert missed_seed / reps < 0.08


def test_share_interval_over_seeds():
    outcomes = np.arange(32) % 16 != 0  # 15 of 16 in each seed
    seeds = np.repeat([0, 1], 16)
    assert share_interval(outcomes) == proportion_interval(30, 32)
    same = share_interval(outcomes, seeds)  # equal shares: the Clopper-Pearson interval
    assert (same.effect, same.low, same.high, same.seeds) == (
        30 / 32, proportion_interval(30, 32).low, proportion_interval(30, 32).high, 2
    )
    apart = np.r_[np.ones(16, bool), np.arange(16) < 8]  # 16/16 and 8/16
    est = share_interval(apart, seeds)
    t = stats.ttest_1samp([1.0, 0.5], 0.0).confidence_interval(0.95)
    assert (est.low, est.high) == pytest.approx((max(t.low, 0.0), min(t.high, 1.0)))
    assert est.effect == 0.75 and verdict_of(est, ">", 0.5) == "inconclusive"
    with pytest.raises(ValueError, match="booleans"):
        share_interval([1, 0, 1])
    with pytest.raises(ValueError, match="no outcomes"):
        share_interval([])


def test_a_takeaway_over_several_seeds_needs_its_seeds():
    values, seeds = seeded([-3.0, -2.0, -4.0], 0.5, 8)
    report = ClaimReport()
    with pytest.raises(ValueError, match="over 3 seeds but its interval over 1"):
        report.takeaway("chosen falls", values, "<", over="8 pairs x 3 seeds")
    with pytest.raises(ValueError, match="over 3 seeds but its interval over 1"):
        report.takeaway_proportion("most fall", values < 0, over="8 pairs x 3 seeds")
    assert report.takeaway("chosen falls", values, "<", over="8 pairs x 3 seeds",
                           seeds=seeds) == "holds"
    assert report.takeaway("one seed", values[:8], "<", over="8 pairs x 1 seeds") == "holds"
    record = parse_verdicts(str(report))[0]
    assert "interval over seeds: seed means" in record["evidence"]
    assert record["interval"] == pytest.approx(
        list(report.claims[0].interval), rel=1e-3
    )


@pytest.mark.parametrize(
    ("k", "n", "message"),
    [
        (2.5, 5, "k must be an integer count, got float 2.5"),
        (2, 5.0, "n must be an integer count, got float 5.0"),
        (True, 5, "k must be an integer count, got bool True"),
    ],
)
def test_proportion_interval_wants_integer_counts(k, n, message):
    with pytest.raises(TypeError, match=message):
        proportion_interval(k, n)
    assert proportion_interval(np.int64(2), 5) == proportion_interval(2, 5)


def test_skill_table_names_a_non_finite_change():
    """(``ge_utils.predict.skill_table``, next to the interval it reports.)"""
    table = pd.DataFrame({"ches": [1.0, 2.0, 3.0, 4.0]})
    with pytest.raises(ValueError, match=r"change has 1 non-finite value\(s\).* at pair\(s\) 2"):
        skill_table(table, [1.0, -1.0, math.nan, -2.0], n_resamples=50)


def test_clustered_share_resamples_whole_clusters():
    """The effect is the share of hits minus the baseline's; the interval is scipy's bootstrap
    of the per-cluster counts (each cluster drawn whole), so outcomes that are copies within a
    cluster get a wider interval than the exact one that counts every outcome as independent."""
    rng = np.random.default_rng(1)
    per_cluster = rng.random(8) < 0.7
    hits = np.repeat(per_cluster, 9)  # 8 clusters whose 9 outcomes are copies
    labels = np.repeat(np.arange(8), 9)
    base = np.zeros(72, dtype=bool)
    base[::3] = True
    est = clustered_share(hits, labels, base, seed=3)
    k = np.array([hits[labels == c].sum() for c in range(8)], dtype=float)
    b = np.array([base[labels == c].sum() for c in range(8)], dtype=float)
    n = np.full(8, 9.0)
    ref = bootstrap_interval((k, b, n), lambda k, b, n: (k.sum() - b.sum()) / n.sum(), seed=3)
    assert est.effect == pytest.approx(hits.mean() - base.mean())
    assert (est.low, est.high, est.n) == pytest.approx((ref.low, ref.high, 8))
    alone = clustered_share(hits, labels)
    exact = proportion_interval(int(hits.sum()), hits.size)
    assert alone.effect == pytest.approx(exact.effect)
    assert alone.high - alone.low > exact.high - exact.low
    runs = labels % 2  # clusters 0, 2, 4, 6 in one run, 1, 3, 5, 7 in another
    two = clustered_share(hits, labels, base, seeds=runs, seed=3)
    means = [hits[runs == r].mean() - base[runs == r].mean() for r in (0, 1)]
    seed_level = mean_interval(means)
    assert two.seeds == 2 and two.effect == pytest.approx(est.effect)
    assert two.low == pytest.approx(min(seed_level.low, est.low))
    assert two.high == pytest.approx(max(seed_level.high, est.high))
    with pytest.raises(ValueError, match="72 outcomes, 72 baseline outcomes and 8 cluster"):
        clustered_share(hits, labels[:8], base)
    with pytest.raises(ValueError, match="outcomes must be booleans"):
        clustered_share(hits.astype(float), labels)
