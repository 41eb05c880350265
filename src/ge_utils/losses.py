"""The margin-loss family of preference optimization, as data and code.

Every loss is written in the paper's general form (Table 2)

    loss = -( m( h_w(u_w) - h_l(u_l) ) + Lambda(u_w) )

or is marked *separable* (a sum of a chosen and a rejected term). Here ``u = log pi(y|x)`` is the
summed response log-prob (nats), ``r = u - u_ref`` the implicit reward and ``|y|`` the response
length in tokens. Its gradient is ``grad loss = -d_w grad u_w + d_l grad u_l``, so
``d_w = -d loss / d u_w`` and ``d_l = d loss / d u_l``: each loss gives these in closed form
(:meth:`MarginLoss.coefficients`) and :func:`autograd_coefficients` recovers them by autograd.

Hinges ``max(0, x)`` use the subgradient 0 at the kink (``1[x > 0]``), the same convention as
``torch.relu``'s backward, so closed form and autograd agree even at the kink.

Hyperparameter names follow the losses' papers; ``lam`` stands for lambda (a Python keyword).

CPO and RRHF add the chosen response's NLL as a *token mean*, ``Lambda = lam u_w / |y_w|`` (as
TRL's CPO trainer and the gradient-entanglement authors' code do); ``cpo_sum`` and ``rrhf_sum``
are the same losses with the summed NLL ``lam u_w``, whose ``d_w`` is larger by ``lam`` against
``lam / |y_w|``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ge_utils.logprobs import SequenceBatch, concat_batches, sequence_logprobs
from ge_utils.objective import MicrostepResult, Objective, PairLogps, pair_logps
from ge_utils.stats import PAIR_KEYS, GhostRecorder

LossFn = Callable[[PairLogps, dict[str, float]], Tensor]
CoefFn = Callable[[PairLogps, dict[str, float]], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class LossSpec:
    """A loss of the family: its Table-2 row (strings with ``$...$`` LaTeX), a description, its
    default hyperparameters with their constraints, and its implementation."""

    name: str
    title: str
    description: str
    m: str
    h_w: str
    h_l: str
    Lambda: str
    d_w: str
    d_l: str
    separable: bool
    defaults: dict[str, float]
    loss_fn: LossFn
    coef_fn: CoefFn
    constraints: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MarginLoss(Objective):
    """A loss with its hyperparameters bound (build it with :func:`get_loss`).

    ``spec`` carries the symbolic Table-2 pieces (``spec.m``, ``spec.h_w``, ``spec.h_l``,
    ``spec.Lambda``, ``spec.d_w``, ``spec.d_l``, ``spec.separable``). As an
    :class:`ge_utils.objective.Objective` it trains on the summed log-probs, logs itself and
    reports every pair's gradient statistics from its training backward.
    """

    spec: LossSpec
    hyperparameters: dict[str, float]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def description(self) -> str:
        return self.spec.description

    @property
    def separable(self) -> bool:
        return self.spec.separable

    def loss(self, p: PairLogps) -> Tensor:
        """(B,) per-pair loss, to be minimized."""
        return self.spec.loss_fn(p, self.hyperparameters)

    def coefficients(self, p: PairLogps) -> tuple[Tensor, Tensor]:
        """Closed-form ``(d_w, d_l)``, each (B,): ``d_w = -dloss/du_w``, ``d_l = dloss/du_l``."""
        return self.spec.coef_fn(p, self.hyperparameters)

    @property
    def logged(self) -> MarginLoss:
        return self

    def microstep(
        self,
        model: nn.Module,
        chosen: SequenceBatch,
        rejected: SequenceBatch,
        ref: tuple[Tensor, Tensor],
        n_total: int,
        record_stats: bool = False,
        ref_tokens: tuple[Tensor, Tensor] | None = None,
    ) -> MicrostepResult:
        """One forward over chosen and rejected, backward of ``loss.sum() / n_total``. With
        ``record_stats`` a :class:`ge_utils.stats.GhostRecorder` recovers every pair's gradient
        statistics from this backward, which carries ``dLoss/du_w = -d_w / n_total`` and
        ``dLoss/du_l = +d_l / n_total``. ``ref_tokens`` is not used."""
        joint = concat_batches(chosen, rejected)
        recorder = GhostRecorder(model, keep_outputs=False, batch=joint) if record_stats else None
        try:
            u = sequence_logprobs(model, joint)
            u_w, u_l = u[: len(chosen)], u[len(chosen) :]
            p = pair_logps(u_w, u_l, chosen, rejected, ref)
            loss = self.loss(p).sum() / n_total
            if not torch.isfinite(loss):
                raise FloatingPointError(float(loss.detach()))
            stats = None
            if recorder is not None:
                d_w, d_l = (d.detach() for d in self.coefficients(p))
            loss.backward()
            if recorder is not None:
                pair = recorder.pair_stats(-d_w / n_total, d_l / n_total)
                stats = {
                    "logp_chosen": u_w.detach(),
                    "logp_rejected": u_l.detach(),
                    "d_w": d_w,
                    "d_l": d_l,
                    **{k: pair[k] for k in PAIR_KEYS},
                }
        finally:
            if recorder is not None:
                recorder.close()
        return loss.detach(), u_w.detach(), u_l.detach(), stats

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v:g}" for k, v in self.hyperparameters.items())
        return f"{self.name}({args})"


def _hinge_on(x: Tensor) -> Tensor:
    """``1[x > 0]`` in the input's dtype: the subgradient of ``max(0, x)`` (0 at the kink)."""
    return (x > 0).to(x.dtype)


# --- DPO family on rewards -------------------------------------------------------------------


def _dpo_z(p: PairLogps, h: dict) -> Tensor:
    return h["beta"] * (p.reward_chosen - p.reward_rejected)


def _dpo_loss(p: PairLogps, h: dict) -> Tensor:
    return -F.logsigmoid(_dpo_z(p, h))


def _dpo_coef(p: PairLogps, h: dict) -> tuple[Tensor, Tensor]:
    d = h["beta"] * torch.sigmoid(-_dpo_z(p, h))
    return d, d


def _ipo_gap(p: PairLogps, h: dict) -> Tensor:
    return p.reward_chosen - p.reward_rejected - 1 / (2 * h["tau"])


def _ipo_loss(p: PairLogps, h: dict) -> Tensor:
    return _ipo_gap(p, h) ** 2


def _ipo_coef(p: PairLogps, h: dict) -> tuple[Tensor, Tensor]:
    d = -2 * _ipo_gap(p, h)
    return d, d


def _rdpo_z(p: PairLogps, h: dict) -> Tensor:
    return _dpo_z(p, h) + h["alpha"] * (p.len_chosen - p.len_rejected)


def _rdpo_loss(p: PairLogps, h: dict) -> Tensor:
    return -F.logsigmoid(_rdpo_z(p, h))


def _rdpo_coef(p: PairLogps, h: dict) -> tuple[Tensor, Tensor]:
    d = h["beta"] * torch.sigmoid(-_rdpo_z(p, h))
    return d, d


def _dpop_z(p: PairLogps, h: dict) -> Tensor:
    penalty = torch.relu(-p.reward_chosen)
    return h["beta"] * (p.reward_chosen - h["lam"] * penalty - p.reward_rejected)


def _dpop_loss(p: PairLogps, h: dict) -> Tensor:
    return -F.logsigmoid(_dpop_z(p, h))


def _dpop_coef(p: PairLogps, h: dict) -> tuple[Tensor, Tensor]:
    s = h["beta"] * torch.sigmoid(-_dpop_z(p, h))
    return s * (1 + h["lam"] * _hinge_on(-p.reward_chosen)), s


# --- losses on policy log-probs (no reference) ------------------------------------------------


def _simpo_z(p: PairLogps, h: dict) -> Tensor:
    return h["beta"] * (p.chosen / p.len_chosen - p.rejected / p.len_rejected) - h["gamma"]


def _simpo_loss(p: PairLogps, h: dict) -> Tensor:
    return -F.logsigmoid(_simpo_z(p, h))


def _simpo_coef(p: PairLogps, h: dict) -> tuple[Tensor, Tensor]:
    s = h["beta"] * torch.sigmoid(-_simpo_z(p, h))
    return s / p.len_chosen, s / p.len_rejected


def _slic_gap(p: PairLogps, h: dict) -> Tensor:
    return h["delta"] - (p.chosen - p.rejected)


def _slic_loss(p: PairLogps, h: dict) -> Tensor:
    return torch.relu(_slic_gap(p, h)) - h["lam"] * p.chosen


def _slic_coef(p: PairLogps, h: dict) -> tuple[Tensor, Tensor]:
    on = _hinge_on(_slic_gap(p, h))
    return on + h["lam"], on


def _cpo_z(p: PairLogps, h: dict) -> Tensor:
    return h["beta"] * (p.chosen - p.rejected)


def _cpo_loss(p: PairLogps, h: dict) -> Tensor:
    return -F.logsigmoid(_cpo_z(p, h)) - h["lam"] * p.chosen / p.len_chosen


def _cpo_coef(p: PairLogps, h: dict) -> tuple[Tensor, Tensor]:
    s = h["beta"] * torch.sigmoid(-_cpo_z(p, h))
    return s + h["lam"] / p.len_chosen, s


def _cpo_sum_loss(p: PairLogps, h: dict) -> Tensor:
    return -F.logsigmoid(_cpo_z(p, h)) - h["lam"] * p.chosen


def _cpo_sum_coef(p: PairLogps, h: dict) -> tuple[Tensor, Tensor]:
    s = h["beta"] * torch.sigmoid(-_cpo_z(p, h))
    return s + h["lam"], s


def _rrhf_gap(p: PairLogps) -> Tensor:
    return p.rejected / p.len_rejected - p.chosen / p.len_chosen


def _rrhf_loss(p: PairLogps, h: dict) -> Tensor:
    return torch.relu(_rrhf_gap(p)) - h["lam"] * p.chosen / p.len_chosen


def _rrhf_coef(p: PairLogps, h: dict) -> tuple[Tensor, Tensor]:
    on = _hinge_on(_rrhf_gap(p))
    return (on + h["lam"]) / p.len_chosen, on / p.len_rejected


def _rrhf_sum_loss(p: PairLogps, h: dict) -> Tensor:
    return torch.relu(_rrhf_gap(p)) - h["lam"] * p.chosen


def _rrhf_sum_coef(p: PairLogps, h: dict) -> tuple[Tensor, Tensor]:
    on = _hinge_on(_rrhf_gap(p))
    return on / p.len_chosen + h["lam"], on / p.len_rejected


def _log_odds(u: Tensor, length: Tensor) -> Tensor:
    """``log(p / (1 - p))`` with ``p = exp(u / |y|)``, via ``expm1`` (no cancellation near
    ``p = 1``); infinite when ``u = 0``."""
    a = u / length
    return a - torch.log(-torch.expm1(a))


def _orpo_z(p: PairLogps) -> Tensor:
    return _log_odds(p.chosen, p.len_chosen) - _log_odds(p.rejected, p.len_rejected)


def _orpo_loss(p: PairLogps, h: dict) -> Tensor:
    return -h["lam"] * F.logsigmoid(_orpo_z(p)) - p.chosen / p.len_chosen


def _orpo_coef(p: PairLogps, h: dict) -> tuple[Tensor, Tensor]:
    s = h["lam"] * torch.sigmoid(-_orpo_z(p))
    # d log-odds / du = 1 / ((1 - p) |y|), with 1 - p = -expm1(u / |y|).
    dw = s / (-torch.expm1(p.chosen / p.len_chosen) * p.len_chosen) + 1 / p.len_chosen
    dl = s / (-torch.expm1(p.rejected / p.len_rejected) * p.len_rejected)
    return dw, dl


# --- separable losses ---------------------------------------------------------------------------


def _sppo_loss(p: PairLogps, h: dict) -> Tensor:
    half = 1 / (2 * h["beta"])
    return (p.reward_chosen - half) ** 2 + (p.reward_rejected + half) ** 2


def _sppo_coef(p: PairLogps, h: dict) -> tuple[Tensor, Tensor]:
    half = 1 / (2 * h["beta"])
    return 2 * (half - p.reward_chosen), 2 * (p.reward_rejected + half)


def _kto_loss(p: PairLogps, h: dict) -> Tensor:
    b = h["beta"]
    return torch.sigmoid(-b * p.reward_chosen) + torch.sigmoid(b * p.reward_rejected)


def _kto_coef(p: PairLogps, h: dict) -> tuple[Tensor, Tensor]:
    b = h["beta"]
    sw, sl = torch.sigmoid(b * p.reward_chosen), torch.sigmoid(b * p.reward_rejected)
    return b * sw * (1 - sw), b * sl * (1 - sl)


_LOG_SIG = r"$\log\sigma(\beta D)$"
_R_W, _R_L = r"$r_w = u_w - u_w^{ref}$", r"$r_l = u_l - u_l^{ref}$"
_S = r"\sigma(-\beta D)"
POSITIVE = "must be > 0"
NON_NEGATIVE = "must be >= 0"
OPEN_UNIT = "must be in (0, 1)"

LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in [
        LossSpec(
            name="dpo",
            title="DPO",
            description="Rafailov et al. (2023): logistic loss on the reward margin.",
            m=_LOG_SIG,
            h_w=_R_W,
            h_l=_R_L,
            Lambda="0",
            d_w=rf"$\beta{_S}$",
            d_l=rf"$\beta{_S}$",
            separable=False,
            defaults={"beta": 0.1},
            loss_fn=_dpo_loss,
            coef_fn=_dpo_coef,
            constraints={"beta": POSITIVE},
        ),
        LossSpec(
            name="ipo",
            title="IPO",
            description=(
                "Azar et al. (2023): squared distance of the reward margin to 1/(2 tau), on "
                "summed log-probs; d_w = d_l turns negative past the target margin."
            ),
            m=r"$-(D - \frac{1}{2\tau})^2$",
            h_w=_R_W,
            h_l=_R_L,
            Lambda="0",
            d_w=r"$2(\frac{1}{2\tau} - D)$",
            d_l=r"$2(\frac{1}{2\tau} - D)$",
            separable=False,
            defaults={"tau": 0.1},
            loss_fn=_ipo_loss,
            coef_fn=_ipo_coef,
            constraints={"tau": POSITIVE},
        ),
        LossSpec(
            name="rdpo",
            title="R-DPO",
            description=(
                "Park et al. (2024): DPO with z = beta D + alpha (|y_w| - |y_l|), the sign of "
                "their Eq. 9 and of the gradient-entanglement authors' code (alpha 0.2)."
            ),
            m=r"$\log\sigma(\beta D + \alpha(|y_w| - |y_l|))$",
            h_w=_R_W,
            h_l=_R_L,
            Lambda="0",
            d_w=r"$\beta\sigma(-z)$",
            d_l=r"$\beta\sigma(-z)$",
            separable=False,
            defaults={"beta": 0.1, "alpha": 0.2},
            loss_fn=_rdpo_loss,
            coef_fn=_rdpo_coef,
            constraints={"beta": POSITIVE},
        ),
        LossSpec(
            name="simpo",
            title="SimPO",
            description=(
                "Meng et al. (2024): reference-free margin of length-averaged log-probs with "
                "target margin gamma; beta 2.0 (the paper's range 2.0-2.5) and gamma 0.5."
            ),
            m=r"$\log\sigma(\beta D - \gamma)$",
            h_w=r"$u_w/|y_w|$",
            h_l=r"$u_l/|y_l|$",
            Lambda="0",
            d_w=r"$\beta\sigma(\gamma - \beta D)/|y_w|$",
            d_l=r"$\beta\sigma(\gamma - \beta D)/|y_l|$",
            separable=False,
            defaults={"beta": 2.0, "gamma": 0.5},
            loss_fn=_simpo_loss,
            coef_fn=_simpo_coef,
            constraints={"beta": POSITIVE},
        ),
        LossSpec(
            name="slic",
            title="SLiC-HF",
            description=(
                "Zhao et al. (2023): hinge on the log-prob margin with margin delta, plus lam "
                "times the summed chosen log-prob (the chosen response as the SFT target)."
            ),
            m=r"$-\max(0, \delta - D)$",
            h_w=r"$u_w$",
            h_l=r"$u_l$",
            Lambda=r"$\lambda u_w$",
            d_w=r"$1[D < \delta] + \lambda$",
            d_l=r"$1[D < \delta]$",
            separable=False,
            defaults={"delta": 1.0, "lam": 0.1},
            loss_fn=_slic_loss,
            coef_fn=_slic_coef,
            constraints={"delta": NON_NEGATIVE, "lam": NON_NEGATIVE},
        ),
        LossSpec(
            name="cpo",
            title="CPO",
            description=(
                "Xu et al. (2024): reference-free DPO plus lam times the token-mean chosen "
                "log-prob (the NLL term as TRL's CPO trainer and the authors' code average it)."
            ),
            m=_LOG_SIG,
            h_w=r"$u_w$",
            h_l=r"$u_l$",
            Lambda=r"$\lambda u_w/|y_w|$ (token-mean NLL)",
            d_w=rf"$\beta{_S} + \lambda/|y_w|$",
            d_l=rf"$\beta{_S}$",
            separable=False,
            defaults={"beta": 0.1, "lam": 1.0},
            loss_fn=_cpo_loss,
            coef_fn=_cpo_coef,
            constraints={"beta": POSITIVE, "lam": NON_NEGATIVE},
        ),
        LossSpec(
            name="cpo_sum",
            title="CPO (summed NLL)",
            description="CPO with the NLL term summed over the chosen tokens: lam u_w.",
            m=_LOG_SIG,
            h_w=r"$u_w$",
            h_l=r"$u_l$",
            Lambda=r"$\lambda u_w$ (summed NLL)",
            d_w=rf"$\beta{_S} + \lambda$",
            d_l=rf"$\beta{_S}$",
            separable=False,
            defaults={"beta": 0.1, "lam": 1.0},
            loss_fn=_cpo_sum_loss,
            coef_fn=_cpo_sum_coef,
            constraints={"beta": POSITIVE, "lam": NON_NEGATIVE},
        ),
        LossSpec(
            name="dpop",
            title="DPOP",
            description=(
                "Pal et al. (2024), DPO-Positive: DPO whose chosen reward is penalized by "
                "lam max(0, -r_w) (lam 50, as in the gradient-entanglement authors' code)."
            ),
            m=_LOG_SIG,
            h_w=r"$r_w - \lambda\max(0, -r_w)$",
            h_l=_R_L,
            Lambda="0",
            d_w=rf"$\beta{_S}(1 + \lambda 1[r_w < 0])$",
            d_l=rf"$\beta{_S}$",
            separable=False,
            defaults={"beta": 0.1, "lam": 50.0},
            loss_fn=_dpop_loss,
            coef_fn=_dpop_coef,
            constraints={"beta": POSITIVE, "lam": NON_NEGATIVE},
        ),
        LossSpec(
            name="rrhf",
            title="RRHF",
            description=(
                "Yuan et al. (2023): ranking hinge on length-averaged log-probs plus lam times "
                "the token-mean chosen log-prob (the NLL term as the authors' code averages it)."
            ),
            m=r"$-\max(0, -D)$",
            h_w=r"$u_w/|y_w|$",
            h_l=r"$u_l/|y_l|$",
            Lambda=r"$\lambda u_w/|y_w|$ (token-mean NLL)",
            d_w=r"$(1[D < 0] + \lambda)/|y_w|$",
            d_l=r"$1[D < 0]/|y_l|$",
            separable=False,
            defaults={"lam": 1.0},
            loss_fn=_rrhf_loss,
            coef_fn=_rrhf_coef,
            constraints={"lam": NON_NEGATIVE},
        ),
        LossSpec(
            name="rrhf_sum",
            title="RRHF (summed NLL)",
            description="RRHF with the NLL term summed over the chosen tokens: lam u_w.",
            m=r"$-\max(0, -D)$",
            h_w=r"$u_w/|y_w|$",
            h_l=r"$u_l/|y_l|$",
            Lambda=r"$\lambda u_w$ (summed NLL)",
            d_w=r"$1[D < 0]/|y_w| + \lambda$",
            d_l=r"$1[D < 0]/|y_l|$",
            separable=False,
            defaults={"lam": 1.0},
            loss_fn=_rrhf_sum_loss,
            coef_fn=_rrhf_sum_coef,
            constraints={"lam": NON_NEGATIVE},
        ),
        LossSpec(
            name="orpo",
            title="ORPO",
            description=(
                "Hong et al. (2024): lam times the log-odds-ratio loss, the odds taken of the "
                "length-averaged probability p = exp(u/|y|), plus the length-averaged chosen "
                "NLL. Needs u < 0 (p < 1)."
            ),
            m=r"$\lambda\log\sigma(D)$",
            h_w=r"$\log\frac{p_w}{1-p_w}$, $p_w = e^{u_w/|y_w|}$",
            h_l=r"$\log\frac{p_l}{1-p_l}$, $p_l = e^{u_l/|y_l|}$",
            Lambda=r"$u_w/|y_w|$ (NLL)",
            d_w=r"$\frac{\lambda\sigma(-D)}{(1-p_w)|y_w|} + \frac{1}{|y_w|}$",
            d_l=r"$\frac{\lambda\sigma(-D)}{(1-p_l)|y_l|}$",
            separable=False,
            defaults={"lam": 0.1},
            loss_fn=_orpo_loss,
            coef_fn=_orpo_coef,
            constraints={"lam": NON_NEGATIVE},
        ),
        LossSpec(
            name="sppo",
            title="SPPO (hard)",
            description=(
                "Wu et al. (2024), hard-label SPPO as in TRL's sppo_hard: each reward regressed "
                "to +-1/(2 beta). The gradient-entanglement authors' code halves the loss "
                "(halving d_w and d_l, not their ratio)."
            ),
            m=r"separable: $-(r_w - \frac{1}{2\beta})^2 - (r_l + \frac{1}{2\beta})^2$",
            h_w=_R_W,
            h_l=_R_L,
            Lambda="0",
            d_w=r"$2(\frac{1}{2\beta} - r_w)$",
            d_l=r"$2(r_l + \frac{1}{2\beta})$",
            separable=True,
            defaults={"beta": 0.1},
            loss_fn=_sppo_loss,
            coef_fn=_sppo_coef,
            constraints={"beta": POSITIVE},
        ),
        LossSpec(
            name="kto_pair",
            title="KTO (pairwise)",
            description=(
                "Ethayarajh et al. (2024), TRL's kto_pair with the reference point (a KL "
                "estimate) set to 0: sigma(-beta r_w) + sigma(beta r_l)."
            ),
            m=r"separable: $\sigma(\beta r_w) + \sigma(-\beta r_l)$ (reference point 0)",
            h_w=_R_W,
            h_l=_R_L,
            Lambda="0",
            d_w=r"$\beta\sigma(\beta r_w)\sigma(-\beta r_w)$",
            d_l=r"$\beta\sigma(\beta r_l)\sigma(-\beta r_l)$",
            separable=True,
            defaults={"beta": 0.1},
            loss_fn=_kto_loss,
            coef_fn=_kto_coef,
            constraints={"beta": POSITIVE},
        ),
    ]
}


def _check_value(loss: str, key: str, value: object, constraint: str | None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{loss}: hyperparameter {key!r} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{loss}: hyperparameter {key!r} must be finite, got {value}")
    if constraint == POSITIVE and value <= 0:
        raise ValueError(f"{loss}: hyperparameter {key!r} {constraint}, got {value}")
    if constraint == NON_NEGATIVE and value < 0:
        raise ValueError(f"{loss}: hyperparameter {key!r} {constraint}, got {value}")
    if constraint == OPEN_UNIT and not 0 < value < 1:
        raise ValueError(f"{loss}: hyperparameter {key!r} {constraint}, got {value}")
    return value


def bind_hyperparameters(
    name: str,
    defaults: dict[str, float],
    constraints: dict[str, str],
    hparams: dict[str, object],
) -> dict[str, float]:
    """``defaults`` overridden by ``hparams``, each checked: unknown names, non-numbers,
    non-finite values and values outside their constraint raise ``ValueError``."""
    for key in hparams:
        if key not in defaults:
            raise ValueError(
                f"{name}: unknown hyperparameter {key!r}; allowed: {', '.join(defaults)}"
            )
    return {
        key: _check_value(name, key, hparams.get(key, default), constraints.get(key))
        for key, default in defaults.items()
    }


def get_loss(name: str, **hparams: float) -> MarginLoss:
    """The loss ``name`` (case-insensitive) with its defaults overridden by ``hparams``.

    Unknown names and hyperparameters, non-numbers, non-finite values and values outside a
    hyperparameter's range raise ``ValueError`` naming the offending value.
    """
    if not isinstance(name, str) or name.lower() not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(LOSSES)}")
    spec = LOSSES[name.lower()]
    return MarginLoss(
        spec, bind_hyperparameters(spec.name, spec.defaults, spec.constraints, hparams)
    )


def autograd_coefficients(loss: MarginLoss, p: PairLogps) -> tuple[Tensor, Tensor]:
    """``(d_w, d_l)``, each (B,), by differentiating the loss: ``d_w = -dloss/du_w``,
    ``d_l = dloss/du_l`` (pairs are independent, so the sum's gradient is per pair)."""
    u_w = p.chosen.detach().clone().requires_grad_(True)
    u_l = p.rejected.detach().clone().requires_grad_(True)
    q = PairLogps(u_w, u_l, p.ref_chosen, p.ref_rejected, p.len_chosen, p.len_rejected)
    g_w, g_l = torch.autograd.grad(loss.loss(q).sum(), (u_w, u_l))
    return -g_w, g_l


def table2() -> pd.DataFrame:
    """The family as the paper's Table 2, one row per loss.

    Columns ``loss`` (display name), ``name`` (for :func:`get_loss`), ``m, h_w, h_l, Lambda, d_w,
    d_l`` (strings with ``$...$`` LaTeX), ``separable``, ``defaults`` (e.g. ``beta=0.1``) and
    ``description``.
    """
    return pd.DataFrame(
        [
            {
                "loss": spec.title,
                "name": spec.name,
                "m": spec.m,
                "h_w": spec.h_w,
                "h_l": spec.h_l,
                "Lambda": spec.Lambda,
                "d_w": spec.d_w,
                "d_l": spec.d_l,
                "separable": spec.separable,
                "defaults": ", ".join(f"{k}={v:g}" for k, v in spec.defaults.items()),
                "description": spec.description,
            }
            for spec in LOSSES.values()
        ]
    )


def table2_markdown(columns: tuple[str, ...] = ("m", "h_w", "h_l", "Lambda", "d_w", "d_l")) -> str:
    """Table 2 as a Markdown table (LaTeX cells render in the book), one row per loss."""
    table = table2()
    head = ["loss", *columns]
    labels = {"loss": "loss", "Lambda": r"$\Lambda$", "separable": "separable"}
    shown = [labels.get(c, f"${c}$") if c not in ("defaults", "name") else c for c in head]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(head)]
    for _, row in table.iterrows():
        cells = [str(row[c]).replace("|", r"\|") for c in head]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def random_pair_logps(n: int, seed: int = 0) -> PairLogps:
    """``n`` random float64 pairs over a broad range: summed log-probs in [-40, -1], rewards in
    [-5, 5] nats, response lengths 1-20 tokens."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)

    u_w, u_l = uniform(-40, -1), uniform(-40, -1)
    return PairLogps(
        chosen=u_w,
        rejected=u_l,
        ref_chosen=u_w - uniform(-5, 5),
        ref_rejected=u_l - uniform(-5, 5),
        len_chosen=torch.randint(1, 21, (n,), generator=gen).double(),
        len_rejected=torch.randint(1, 21, (n,), generator=gen).double(),
    )


def coefficient_check(n: int = 256, seed: int = 0) -> pd.DataFrame:
    """Every loss's closed-form ``d_w, d_l`` against autograd on :func:`random_pair_logps`, at
    its default hyperparameters: one row per loss with the largest error relative to the
    largest autograd coefficient (``max_rel_err``)."""
    p = random_pair_logps(n, seed)
    rows = []
    for name in LOSSES:
        loss = get_loss(name)
        closed = loss.coefficients(p)
        auto = autograd_coefficients(loss, p)
        scale = max(float(a.abs().max()) for a in auto) or 1.0
        err = max(float((c - a).abs().max()) for c, a in zip(closed, auto, strict=True))
        rows.append({"loss": loss.spec.title, "name": name, "pairs": n, "max_rel_err": err / scale})
    return pd.DataFrame(rows)
