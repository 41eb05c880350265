"""Claims and their evidence: each notebook ends by checking the paper's claims on this run.

Three kinds of lines are kept apart:

- ``takeaway``: an empirical claim of the paper, as the paper states it, measured in this run.
  It carries an *effect* (e.g. the mean change of the held-out chosen log-prob, in nats), a 95%
  interval and what the interval is over (``"16 held-out pairs x 3 seeds"``). Values from
  several seeds come with their seed labels: the pairs of one seed share one training run, so
  they are not independent samples of the claim (see :func:`mean_interval`).
- ``guarantee``: a theorem, stated with its conditions, checked against a realized change.
- ``consistency``: an identity of our own statistics (a squared norm is >= 0, Cauchy-Schwarz,
  a coefficient that holds by construction). It checks the code, never the paper, and is not
  counted as a takeaway.

A takeaway's verdict is three-valued, read off its interval against the null value ``null`` on
the side the claim expects (``expect``, ``">"`` or ``"<"``)::

    holds           the whole interval lies on the expected side of the null
    does not hold   the whole interval lies on the other side
    inconclusive    the interval covers the null

Guarantees and consistency checks hold or do not hold; one with nothing to check in the run
(``holds=None``, e.g. :func:`every` of zero cases) is inconclusive, never vacuously held. The
interval math is scipy's: the
Student-t interval of a mean (:func:`mean_interval`, also for paired differences), the exact
Clopper-Pearson interval of a proportion (:func:`proportion_interval`, :func:`share_interval`)
and the bootstrap (:func:`bootstrap_interval`, BCa by default).

Over several seeds (pairs nested in training runs) an interval is the seed-level one: the
t-interval of the per-seed means (shares), on ``seeds - 1`` degrees of freedom, which for a
balanced design is the exact interval of the mean in the one-way random-effects model
``value = mu + run effect + pair noise``; it is widened where needed to cover the pooled interval
over every value, which alone would count the pairs of one run as independent. With 3 seeds the
t quantile is 4.30, with 2 seeds 12.7: few seeds give wide intervals, and the verdicts say so.

A takeaway or guarantee may name the poster row it speaks to (``poster=``, one of
:data:`POSTER`); the landing page lists the poster's takeaways first, with every line that names
each. A printed line reads (the runner parses it back into ``results/<chapter>.json``)::

    [takeaway] HOLDS: <claim> | effect -7.96 nats, 95% CI [-9.1, -6.8], over 16 pairs x 3 seeds | ..
    [guarantee @theorem1] DOES NOT HOLD: <claim> | over 12 pairs | <evidence>
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
from scipy import stats

Kind = Literal["takeaway", "guarantee", "consistency"]
Verdict = Literal["holds", "does not hold", "inconclusive"]
Expect = Literal[">", "<"]
KINDS: tuple[str, ...] = ("takeaway", "guarantee", "consistency")
VERDICTS: tuple[str, ...] = ("holds", "does not hold", "inconclusive")
CONFIDENCE = 0.95
#: How intervals over several seeds are formed; results files record it (their provenance's
#: ``intervals``), so that a run made under another rule is marked where it is shown.
INTERVALS = "seed-level"

#: The poster's takeaways, in its order: the rows of the landing page.
POSTER: dict[str, str] = {
    "chosen-falls": "The chosen log-probability may decrease under margin-based training",
    "co-movement": "Chosen and rejected log-probabilities move together",
    "condition": "The gradient condition explains which way each side moves",
    "theorem1": "Theorem 1: single-token responses give a negative inner product, "
    "chosen up and rejected down",
    "theorem3": "Theorem 3: a shared suffix gives a positive inner product that grows "
    "with the suffix, and both fall",
    "tokenwise": "Token-wise: the contrastive token's inner product can be negative; "
    "the shared tokens carry the entanglement",
    "sppo": "SPPO: d_w/d_l > 1 and |g_l|^2 > |g_w|^2, so the condition is more lenient",
    "regularization": "Explicit regularization of the chosen log-probability makes it "
    "more likely to rise",
    "normalized": "Mitigation: pairwise normalized gradient descent",
    "masked": "Mitigation: sparsity-regularized token masking",
}

_NUM = r"[-+]?(?:\d+\.?\d*(?:e[-+]?\d+)?|inf|nan)"
VERDICT_LINE = re.compile(
    r"^\[(?P<kind>takeaway|guarantee|consistency)(?: @(?P<poster>[a-z0-9-]+))?\] "
    r"(?P<verdict>HOLDS|DOES NOT HOLD|INCONCLUSIVE): (?P<claim>[^|]+?) \| "
    r"(?:effect (?P<effect>" + _NUM + r")(?: (?P<unit>[^,|]+))?, 95% CI \[(?P<low>" + _NUM
    + r"), (?P<high>" + _NUM + r")\], )?over (?P<over>[^|]*?) \| (?P<evidence>[^|]*)$"
)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95% interval, from ``n`` observations of ``seeds`` training
    runs; ``detail`` says how a seed-level interval was formed (it joins a takeaway's evidence)."""

    effect: float
    low: float
    high: float
    n: int
    seeds: int = 1
    detail: str = ""

    def __post_init__(self) -> None:
        if math.isnan(self.effect):
            return  # undefined (a report records it as inconclusive)
        if not self.low <= self.high:
            raise ValueError(f"interval [{self.low}, {self.high}] is not ordered")


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _finite(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float).ravel()
    if arr.size == 0:
        raise ValueError(f"{what}: no values")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}: {int((~np.isfinite(arr)).sum())} non-finite values")
    return arr


def _t_interval(arr: np.ndarray) -> Estimate:
    mean = float(arr.mean())
    if arr.size < 2:
        return Estimate(mean, -math.inf, math.inf, 1)
    if float(np.ptp(arr)) == 0.0:  # all equal (their float std need not be exactly 0)
        return Estimate(mean, mean, mean, int(arr.size))
    ci = stats.ttest_1samp(arr, 0.0).confidence_interval(CONFIDENCE)
    return Estimate(mean, float(ci.low), float(ci.high), int(arr.size))


def _seed_groups(arr: np.ndarray, seeds: Sequence | np.ndarray, what: str) -> list[np.ndarray]:
    labels = np.asarray(seeds).ravel()
    if labels.size != arr.size:
        raise ValueError(f"{what}: {arr.size} values but {labels.size} seed labels")
    if labels.dtype.kind == "f" and np.isnan(labels).any():
        raise ValueError(f"{what}: {int(np.isnan(labels).sum())} seed labels are NaN")
    return [arr[labels == s] for s in dict.fromkeys(labels.tolist())]


def _over_seeds(pooled: Estimate, seed_level: Estimate, per_seed: np.ndarray) -> Estimate:
    """``seed_level`` widened to cover ``pooled``; the effect stays the pooled one."""
    low, high = min(pooled.low, seed_level.low), max(pooled.high, seed_level.high)
    detail = (
        f"seed means {', '.join(_fmt(m) for m in per_seed)} give [{_fmt(seed_level.low)}, "
        f"{_fmt(seed_level.high)}]; pooled over {pooled.n} values [{_fmt(pooled.low)}, "
        f"{_fmt(pooled.high)}]"
    )
    return Estimate(pooled.effect, low, high, pooled.n, int(per_seed.size), detail)


def mean_interval(
    values: Sequence[float] | np.ndarray, seeds: Sequence | np.ndarray | None = None
) -> Estimate:
    """Mean of ``values`` and its Student-t 95% interval (``scipy.stats.ttest_1samp``).

    ``seeds`` labels each value with the training run it came from. With two or more seeds the
    interval is the t-interval of the per-seed means (``seeds - 1`` degrees of freedom), widened
    where needed to cover the pooled t-interval over all values; the effect is the mean of all
    values. Without ``seeds`` (or with one) it is the pooled t-interval. A single value has no
    interval (``[-inf, inf]``: any claim on it is inconclusive); values that are all equal have
    a zero-width one.
    """
    arr = _finite(values, "mean_interval")
    pooled = _t_interval(arr)
    groups = [] if seeds is None else _seed_groups(arr, seeds, "mean_interval")
    if len(groups) < 2:
        return pooled
    per_seed = np.array([g.mean() for g in groups])
    return _over_seeds(pooled, _t_interval(per_seed), per_seed)


def paired_difference(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    seeds: Sequence | np.ndarray | None = None,
) -> Estimate:
    """Mean of ``a - b`` over paired observations (same pairs, same seeds): the interval of
    :func:`mean_interval` of the differences (``seeds``: each observation's seed)."""
    x, y = _finite(a, "paired_difference a"), _finite(b, "paired_difference b")
    if x.shape != y.shape:
        raise ValueError(f"paired_difference: {x.size} values against {y.size}")
    return mean_interval(x - y, seeds)


def proportion_interval(k: int, n: int) -> Estimate:
    """Share ``k / n`` with its exact (Clopper-Pearson) 95% interval (``scipy.stats.binomtest``).

    ``k`` and ``n`` must be integers (Python or NumPy, not bool), ``0 <= k <= n``, ``n > 0``."""
    for name, value in (("k", k), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(
                f"proportion_interval: {name} must be an integer count, got "
                f"{type(value).__name__} {value!r}"
            )
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"proportion_interval needs 0 <= k <= n and n > 0, got k={k}, n={n}")
    ci = stats.binomtest(int(k), int(n)).proportion_ci(CONFIDENCE, method="exact")
    return Estimate(k / n, float(ci.low), float(ci.high), int(n))


def share_interval(
    outcomes: Sequence[bool] | np.ndarray, seeds: Sequence | np.ndarray | None = None
) -> Estimate:
    """Share of true ``outcomes`` with its 95% interval.

    Without ``seeds`` (or with one) the exact Clopper-Pearson interval
    (:func:`proportion_interval`). With two or more, the t-interval of the per-seed shares,
    clipped to [0, 1] and widened where needed to cover the pooled Clopper-Pearson interval
    (which also keeps per-seed shares that happen to be equal from giving a zero-width one).
    """
    arr = np.asarray(outcomes).ravel()
    if arr.size == 0:
        raise ValueError("share_interval: no outcomes")
    if arr.dtype != bool:
        raise ValueError(f"share_interval: outcomes must be booleans, got {arr.dtype}")
    pooled = proportion_interval(int(arr.sum()), int(arr.size))
    groups = [] if seeds is None else _seed_groups(arr, seeds, "share_interval")
    if len(groups) < 2:
        return pooled
    per_seed = np.array([g.mean() for g in groups])
    t = _t_interval(per_seed)
    seed_level = Estimate(t.effect, max(t.low, 0.0), min(t.high, 1.0), t.n)
    return _over_seeds(pooled, seed_level, per_seed)


def bootstrap_interval(
    data: tuple[Sequence[float] | np.ndarray, ...],
    statistic: Callable[..., float],
    n_resamples: int = 2000,
    seed: int = 0,
    paired: bool = True,
    method: str = "BCa",
) -> Estimate:
    """``statistic(*data)`` and its bootstrap 95% interval (``scipy.stats.bootstrap``).

    ``paired`` resamples the same indices from every array (e.g. a score and its outcome).
    Where BCa is undefined (its acceleration is 0/0 when every leave-one-out value of the
    statistic is equal, as for an AUROC of 1 or a median that no single point moves), the
    percentile interval of the same resamples is used instead; a degenerate resample
    distribution (all resamples equal) gives a zero-width interval, a statistic that is NaN
    on some resample an unbounded one.
    """
    arrays = tuple(_finite(d, "bootstrap_interval") for d in data)
    effect = float(statistic(*arrays))
    if arrays[0].size < 2:
        return Estimate(effect, -math.inf, math.inf, int(arrays[0].size))

    def interval(how: str) -> tuple[float, float]:
        res = stats.bootstrap(
            arrays,
            statistic,
            n_resamples=n_resamples,
            paired=paired,
            vectorized=False,
            confidence_level=CONFIDENCE,
            method=how,
            rng=np.random.default_rng(seed),
        )
        return float(res.confidence_interval.low), float(res.confidence_interval.high)

    with warnings.catch_warnings():  # scipy's own warning where BCa is undefined: handled below
        warnings.filterwarnings("ignore", module="scipy")
        low, high = interval(method)
    if (math.isnan(low) or math.isnan(high)) and method.lower() != "percentile":
        low, high = interval("percentile")
    if math.isnan(low) or math.isnan(high):
        return Estimate(effect, -math.inf, math.inf, int(arrays[0].size))
    return Estimate(effect, min(low, effect), max(high, effect), int(arrays[0].size))


def clustered_share(
    outcomes: Sequence[bool] | np.ndarray,
    clusters: Sequence | np.ndarray,
    baseline: Sequence[bool] | np.ndarray | None = None,
    seeds: Sequence | np.ndarray | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Estimate:
    """Share of true ``outcomes``, minus the share of true ``baseline`` outcomes on the same
    rows where given (e.g. always guessing the most common answer), with a bootstrap 95%
    interval that resamples whole ``clusters`` (:func:`bootstrap_interval` on the per-cluster
    counts; the statistic is their ratio, sum of hits over sum of rows): the outcomes of one
    held-out pair at several checkpoints and losses are not independent samples, so the pair,
    not the outcome, is the unit resampled (cluster labels unique across runs). ``n`` of the
    estimate is the number of clusters. ``seeds`` labels each row's training run: with two or
    more, the interval is the t-interval of the per-seed effects, widened where needed to cover
    the bootstrap one, as in :func:`share_interval`."""
    hits = np.asarray(outcomes).ravel()
    base = np.zeros_like(hits) if baseline is None else np.asarray(baseline).ravel()
    labels = np.asarray(clusters).ravel()
    for name, arr in (("outcomes", hits), ("baseline", base)):
        if arr.dtype != bool:
            raise ValueError(f"clustered_share: {name} must be booleans, got {arr.dtype}")
    if not hits.size == base.size == labels.size:
        raise ValueError(
            f"clustered_share: {hits.size} outcomes, {base.size} baseline outcomes and "
            f"{labels.size} cluster labels"
        )
    if hits.size == 0:
        raise ValueError("clustered_share: no outcomes")
    groups = _seed_groups(hits.astype(float), labels, "clustered_share")
    base_groups = _seed_groups(base.astype(float), labels, "clustered_share")
    k = np.array([g.sum() for g in groups])
    b = np.array([g.sum() for g in base_groups])
    n = np.array([g.size for g in groups], dtype=float)
    pooled = bootstrap_interval(
        (k, b, n), lambda k, b, n: (k.sum() - b.sum()) / n.sum(), n_resamples, seed
    )
    if seeds is None:
        return pooled
    runs = zip(
        _seed_groups(hits.astype(float), seeds, "clustered_share"),
        _seed_groups(base.astype(float), seeds, "clustered_share"),
        strict=True,
    )
    per_seed = np.array([h.mean() - g.mean() for h, g in runs])
    if per_seed.size < 2:
        return pooled
    return _over_seeds(pooled, _t_interval(per_seed), per_seed)


def verdict_of(est: Estimate, expect: Expect, null: float = 0.0) -> Verdict:
    """Three-valued verdict of a claim that the effect is ``expect`` (``>`` or ``<``) ``null``.

    A zero-width interval on the null is inconclusive: it does not lie on either side.
    """
    if expect not in (">", "<"):
        raise ValueError(f"expect must be '>' or '<', got {expect!r}")
    above, below = est.low > null, est.high < null
    if (above and expect == ">") or (below and expect == "<"):
        return "holds"
    if above or below:
        return "does not hold"
    return "inconclusive"


@dataclass(frozen=True)
class Claim:
    """One verdict line; ``interval`` is ``(low, high)`` or ``None``."""

    kind: Kind
    claim: str
    verdict: Verdict
    over: str
    evidence: str
    effect: float | None = None
    interval: tuple[float, float] | None = None
    unit: str = ""
    poster: str | None = None

    def line(self) -> str:
        stat = ""
        if self.effect is not None and self.interval is not None:
            unit = f" {self.unit}" if self.unit else ""
            lo, hi = self.interval
            stat = f"effect {_fmt(self.effect)}{unit}, 95% CI [{_fmt(lo)}, {_fmt(hi)}], "
        tag = f" @{self.poster}" if self.poster else ""
        return (
            f"[{self.kind}{tag}] {self.verdict.upper()}: {self.claim} | {stat}over {self.over} | "
            f"{self.evidence}"
        )


def every(passed: int, total: int) -> bool | None:
    """Whether all ``total`` cases of a guarantee or consistency check passed (``passed`` of
    them); ``None`` when there was no case to check, so that the line reads inconclusive."""
    if not 0 <= passed <= total:
        raise ValueError(f"{passed} of {total} cases passed: not a count of those cases")
    return None if total == 0 else passed == total


def _checked(holds: bool | None) -> Verdict:
    if holds is None:
        return "inconclusive"
    return "holds" if bool(holds) else "does not hold"


def _poster(poster: str | None) -> str | None:
    if poster is not None and poster not in POSTER:
        raise ValueError(f"unknown poster takeaway {poster!r}; known: {', '.join(POSTER)}")
    return poster


def _clean(text: str, what: str) -> str:
    text = " ".join(str(text).split())
    if "|" in text:
        raise ValueError(f"{what} may not contain '|': {text!r}")
    return text


@dataclass
class ClaimReport:
    """Collects claims; ``print(report)`` shows one verdict line per claim."""

    claims: list[Claim] = field(default_factory=list)

    def _add(self, claim: Claim) -> Claim:
        self.claims.append(claim)
        return claim

    def takeaway_estimate(
        self,
        claim: str,
        est: Estimate,
        expect: Expect,
        null: float = 0.0,
        over: str = "",
        unit: str = "",
        evidence: str = "",
        poster: str | None = None,
    ) -> Verdict:
        """An empirical claim of the paper whose effect and interval are ``est``.

        An undefined effect (NaN: e.g. an AUROC where every pair had the same outcome) is
        recorded as inconclusive, without an effect or interval, and says so. An ``over`` that
        names several seeds ("16 held-out pairs x 3 seeds") needs an estimate over that many
        seeds (built with ``seeds=``): an interval that counts one run's pairs as independent
        is refused.
        """
        if not over:
            raise ValueError(f"a takeaway says what its interval is over: {claim!r}")
        named = re.search(r"(\d+) seeds\b", over)
        if named and int(named[1]) > 1 and est.seeds != int(named[1]):
            raise ValueError(
                f"{claim!r} is over {named[1]} seeds but its interval over {est.seeds}: give each "
                "value's seed (seeds=), so that the pairs of one run count as one sample"
            )
        side = f"{expect} {_fmt(null)}"
        ev = f"claimed {side}" + (f"; {evidence}" if evidence else "")
        if est.detail:
            ev += f"; interval over seeds: {est.detail}"
        if math.isnan(est.effect):
            self._add(
                Claim("takeaway", _clean(claim, "claim"), "inconclusive", _clean(over, "over"),
                      _clean(f"effect undefined in this run; {ev}", "evidence"),
                      poster=_poster(poster))
            )
            return "inconclusive"
        verdict = verdict_of(est, expect, null)
        self._add(
            Claim(
                "takeaway",
                _clean(claim, "claim"),
                verdict,
                _clean(over, "over"),
                _clean(ev, "evidence"),
                est.effect,
                (est.low, est.high),
                _clean(unit, "unit"),
                _poster(poster),
            )
        )
        return verdict

    def takeaway(
        self,
        claim: str,
        values: Sequence[float] | np.ndarray,
        expect: Expect,
        null: float = 0.0,
        over: str = "",
        unit: str = "",
        evidence: str = "",
        poster: str | None = None,
        seeds: Sequence | np.ndarray | None = None,
    ) -> Verdict:
        """An empirical claim about the mean of ``values`` (t-interval; ``seeds``: each value's
        seed, see :func:`mean_interval`)."""
        return self.takeaway_estimate(
            claim, mean_interval(values, seeds), expect, null, over, unit, evidence, poster
        )

    def takeaway_proportion(
        self,
        claim: str,
        outcomes: Sequence[bool] | np.ndarray,
        expect: Expect = ">",
        null: float = 0.5,
        over: str = "",
        evidence: str = "",
        poster: str | None = None,
        seeds: Sequence | np.ndarray | None = None,
    ) -> Verdict:
        """An empirical claim about the share of true ``outcomes`` (Clopper-Pearson interval;
        ``seeds``: each outcome's seed, see :func:`share_interval`)."""
        arr = np.asarray(outcomes).ravel()
        ev = f"{int(arr.sum())}/{arr.size}" + (f"; {evidence}" if evidence else "")
        return self.takeaway_estimate(
            claim, share_interval(arr, seeds), expect, null, over, "", ev, poster
        )

    def guarantee(
        self,
        claim: str,
        holds: bool | None,
        conditions: str,
        evidence: str,
        over: str = "this run",
        poster: str | None = None,
    ) -> Verdict:
        """A theorem under ``conditions``, checked against a realized change (``holds=None``:
        no case met the conditions in this run, inconclusive)."""
        if not conditions:
            raise ValueError(f"a guarantee states its conditions: {claim!r}")
        verdict = _checked(holds)
        ev = f"conditions: {conditions}; {evidence}"
        self._add(
            Claim("guarantee", _clean(claim, "claim"), verdict, _clean(over, "over"),
                  _clean(ev, "evidence"), poster=_poster(poster))
        )
        return verdict

    def consistency(
        self, claim: str, holds: bool | None, evidence: str, over: str = "this run"
    ) -> Verdict:
        """An identity of the measured statistics: a check of the code, not of the paper
        (``holds=None``: nothing to check in this run, inconclusive)."""
        verdict = _checked(holds)
        self._add(
            Claim("consistency", _clean(claim, "claim"), verdict, _clean(over, "over"),
                  _clean(evidence, "evidence"))
        )
        return verdict

    def __str__(self) -> str:
        return "\n".join(c.line() for c in self.claims)

    def to_records(self) -> list[dict]:
        return [_record(asdict(c)) for c in self.claims]


def _record(d: dict) -> dict:
    d["interval"] = list(d["interval"]) if d["interval"] is not None else None
    return d


def parse_verdicts(text: str) -> list[dict]:
    """Claims (as results-file records) from verdict lines in ``text``; other lines are ignored.

    A record has ``kind``, ``verdict``, ``claim``, ``effect`` (number or None), ``interval``
    (``[low, high]`` or None), ``unit``, ``over``, ``evidence`` and ``poster`` (or None).
    """
    out = []
    for line in text.splitlines():
        m = VERDICT_LINE.match(line.strip())
        if not m:
            continue
        has_effect = m["effect"] is not None
        out.append(
            {
                "kind": m["kind"],
                "verdict": m["verdict"].lower(),
                "claim": m["claim"],
                "effect": float(m["effect"]) if has_effect else None,
                "interval": [float(m["low"]), float(m["high"])] if has_effect else None,
                "unit": (m["unit"] or "").strip(),
                "over": m["over"],
                "evidence": m["evidence"],
                "poster": m["poster"],
            }
        )
    return out
