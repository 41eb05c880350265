"""The margin-loss family of preference optimization, as data and code.

Every loss is written in the paper's general form (Table 2)

    loss = -( m( h_w(u_w) - h_l(u_l) ) + Lambda(u_w) )

or is marked *separable* (a sum of a chosen and a rejected term). Here ``u = log pi(y|x)`` is the
summed response log-prob (nats), ``r = u - u_ref`` the implicit reward and ``|y|`` the response
length in tokens. Its gradient is ``grad loss = -d_w grad u_w + d_l grad u_l``, so
``d_w = -d loss / d u_w`` and ``d_l = d loss / d u_l``: each loss gives these in closed form
(:meth:`MarginLoss.coefficients`) and :func:`autograd_coefficients` recovers them by autograd.

Hinges ``max(0, x)`` use the subgradient 0 at the kink (``1[x > 0]``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class PairLogps:
    """Per-pair quantities, each (B,): summed policy log-probs ``chosen`` (u_w) and
    ``rejected`` (u_l), reference log-probs (zeros without a reference) and response lengths in
    tokens (float)."""

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    len_chosen: Tensor
    len_rejected: Tensor

    @property
    def reward_chosen(self) -> Tensor:
        return self.chosen - self.ref_chosen

    @property
    def reward_rejected(self) -> Tensor:
        return self.rejected - self.ref_rejected


LossFn = Callable[[PairLogps, dict[str, float]], Tensor]
CoefFn = Callable[[PairLogps, dict[str, float]], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class LossSpec:
    """A loss of the family: its Table-2 row (LaTeX strings), defaults and implementation."""

    name: str
    title: str
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
class MarginLoss:
    """A loss with its hyperparameters bound."""

    spec: LossSpec
    params: dict[str, float]

    @property
    def name(self) -> str:
        return self.spec.name

    def loss(self, p: PairLogps) -> Tensor:
        """(B,) per-pair loss, to be minimized."""
        return self.spec.loss_fn(p, self.params)

    def coefficients(self, p: PairLogps) -> tuple[Tensor, Tensor]:
        """Closed-form ``(d_w, d_l)``, each (B,)."""
        return self.spec.coef_fn(p, self.params)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.name}({args})"


def _sig(x: Tensor) -> Tensor:
    return torch.sigmoid(x)


def _hinge_on(x: Tensor) -> Tensor:
    """``1[x > 0]`` as the input's dtype (the subgradient of ``max(0, x)``)."""
    return (x > 0).to(x.dtype)


# --- DPO family on rewards -------------------------------------------------------------------


def _dpo_z(p: PairLogps, h: dict) -> Tensor:
    return h["beta"] * (p.reward_chosen - p.reward_rejected)


def _dpo_loss(p: PairLogps, h: dict) -> Tensor:
    return -F.logsigmoid(_dpo_z(p, h))


def _dpo_coef(p: PairLogps, h: dict) -> tuple[Tensor, Tensor]:
    d = h["beta"] * _sig(-_dpo_z(p, h))
    return d, d


def _ipo_gap(p: PairLogps, h: dict) -> Tensor:
    return p.reward_chosen - p.reward_rejected - 1 / (2 * h["tau"])


def _ipo_loss(p: PairLogps, h: dict) -> Tensor:
    return _ipo_gap(p, h) ** 2


def _ipo_coef(p: PairLogps, h: dict) -> tuple[Tensor, Tensor]:
    d = -2 * _ipo_gap(p, h)
    return d, d


def _rdpo_z(p: PairLogps, h: dict) -> Tensor:
    return _dpo_z(p, h) - h["alpha"] * (p.len_chosen - p.len_rejected)


def _rdpo_loss(p: PairLogps, h: dict) -> Tensor:
    return -F.logsigmoid(_rdpo_z(p, h))


def _rdpo_coef(p: PairLogps, h: dict) -> tuple[Tensor, Tensor]:
    d = h["beta"] * _sig(-_rdpo_z(p, h))
    return d, d


def _dpop_penalty(p: PairLogps) -> Tensor:
    return torch.clamp(-p.reward_chosen, min=0)


def _dpop_z(p: PairLogps, h: dict) -> Tensor:
    return h["beta"] * (p.reward_chosen - h["lam"] * _dpop_penalty(p) - p.reward_rejected)


def _dpop_loss(p: PairLogps, h: dict) -> Tensor:
    return -F.logsigmoid(_dpop_z(p, h))


def _dpop_coef(p: PairLogps, h: dict) -> tuple[Tensor, Tensor]:
    s = h["beta"] * _sig(-_dpop_z(p, h))
    return s * (1 + h["lam"] * _hinge_on(-p.reward_chosen)), s


# --- losses on policy log-probs (no reference) ------------------------------------------------


def _simpo_z(p: PairLogps, h: dict) -> Tensor:
    return h["beta"] * (p.chosen / p.len_chosen - p.rejected / p.len_rejected) - h["gamma"]


def _simpo_loss(p: PairLogps, h: dict) -> Tensor:
    return -F.logsigmoid(_simpo_z(p, h))


def _simpo_coef(p: PairLogps, h: dict) -> tuple[Tensor, Tensor]:
    s = h["beta"] * _sig(-_simpo_z(p, h))
    return s / p.len_chosen, s / p.len_rejected


def _slic_gap(p: PairLogps, h: dict) -> Tensor:
    return h["delta"] - (p.chosen - p.rejected)


def _slic_loss(p: PairLogps, h: dict) -> Tensor:
    return torch.clamp(_slic_gap(p, h), min=0) - h["lam"] * p.chosen


def _slic_coef(p: PairLogps, h: dict) -> tuple[Tensor, Tensor]:
    on = _hinge_on(_slic_gap(p, h))
    return on + h["lam"], on


def _cpo_z(p: PairLogps, h: dict) -> Tensor:
    return h["beta"] * (p.chosen - p.rejected)


def _cpo_loss(p: PairLogps, h: dict) -> Tensor:
    return -F.logsigmoid(_cpo_z(p, h)) - h["lam"] * p.chosen


def _cpo_coef(p: PairLogps, h: dict) -> tuple[Tensor, Tensor]:
    s = h["beta"] * _sig(-_cpo_z(p, h))
    return s + h["lam"], s


def _rrhf_gap(p: PairLogps) -> Tensor:
    return p.rejected / p.len_rejected - p.chosen / p.len_chosen


def _rrhf_loss(p: PairLogps, h: dict) -> Tensor:
    return torch.clamp(_rrhf_gap(p), min=0) - h["lam"] * p.chosen


def _rrhf_coef(p: PairLogps, h: dict) -> tuple[Tensor, Tensor]:
    on = _hinge_on(_rrhf_gap(p))
    return on / p.len_chosen + h["lam"], on / p.len_rejected


def _log_odds(u: Tensor, length: Tensor) -> Tensor:
    """``log(p / (1 - p))`` with ``p = exp(u / |y|)``, computed without cancellation."""
    a = u / length
    return a - torch.log(-torch.expm1(a))


def _orpo_z(p: PairLogps) -> Tensor:
    return _log_odds(p.chosen, p.len_chosen) - _log_odds(p.rejected, p.len_rejected)


def _orpo_loss(p: PairLogps, h: dict) -> Tensor:
    return -h["lam"] * F.logsigmoid(_orpo_z(p)) - p.chosen / p.len_chosen


def _orpo_coef(p: PairLogps, h: dict) -> tuple[Tensor, Tensor]:
    s = h["lam"] * _sig(-_orpo_z(p))
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
    return (1 - _sig(b * p.reward_chosen)) + (1 - _sig(-b * p.reward_rejected))


def _kto_coef(p: PairLogps, h: dict) -> tuple[Tensor, Tensor]:
    b = h["beta"]
    sw, sl = _sig(b * p.reward_chosen), _sig(-b * p.reward_rejected)
    return b * sw * (1 - sw), b * sl * (1 - sl)


_LOG_SIG = r"$\log\sigma(\beta D)$"
_R_W, _R_L = r"$r_w = u_w - u_w^{ref}$", r"$r_l = u_l - u_l^{ref}$"
_S = r"\sigma(-\beta D)"
_POSITIVE = "must be > 0"
_NON_NEGATIVE = "must be >= 0"

LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in [
        LossSpec(
            "dpo",
            "DPO",
            _LOG_SIG,
            _R_W,
            _R_L,
            "0",
            rf"$\beta{_S}$",
            rf"$\beta{_S}$",
            False,
            {"beta": 0.1},
            _dpo_loss,
            _dpo_coef,
            {"beta": _POSITIVE},
        ),
        LossSpec(
            "ipo",
            "IPO",
            r"$-(D - \frac{1}{2\tau})^2$",
            _R_W,
            _R_L,
            "0",
            r"$2(\frac{1}{2\tau} - D)$",
            r"$2(\frac{1}{2\tau} - D)$",
            False,
            {"tau": 0.1},
            _ipo_loss,
            _ipo_coef,
            {"tau": _POSITIVE},
        ),
        LossSpec(
            "rdpo",
            "R-DPO",
            r"$\log\sigma(\beta D - \alpha(|y_w| - |y_l|))$",
            _R_W,
            _R_L,
            "0",
            r"$\beta\sigma(-z)$",
            r"$\beta\sigma(-z)$",
            False,
            {"beta": 0.1, "alpha": 0.2},
            _rdpo_loss,
            _rdpo_coef,
            {"beta": _POSITIVE},
        ),
        LossSpec(
            "simpo",
            "SimPO",
            r"$\log\sigma(\beta D - \gamma)$",
            r"$u_w/|y_w|$",
            r"$u_l/|y_l|$",
            "0",
            r"$\beta\sigma(\gamma - \beta D)/|y_w|$",
            r"$\beta\sigma(\gamma - \beta D)/|y_l|$",
            False,
            {"beta": 2.0, "gamma": 0.5},
            _simpo_loss,
            _simpo_coef,
            {"beta": _POSITIVE},
        ),
        LossSpec(
            "slic",
            "SLiC-HF",
            r"$-\max(0, \delta - D)$",
            r"$u_w$",
            r"$u_l$",
            r"$\lambda u_w$",
            r"$1[D < \delta] + \lambda$",
            r"$1[D < \delta]$",
            False,
            {"delta": 1.0, "lam": 0.1},
            _slic_loss,
            _slic_coef,
            {"delta": _NON_NEGATIVE, "lam": _NON_NEGATIVE},
        ),
        LossSpec(
            "cpo",
            "CPO",
            _LOG_SIG,
            r"$u_w$",
            r"$u_l$",
            r"$\lambda u_w$ (NLL)",
            rf"$\beta{_S} + \lambda$",
            rf"$\beta{_S}$",
            False,
            {"beta": 0.1, "lam": 1.0},
            _cpo_loss,
            _cpo_coef,
            {"beta": _POSITIVE, "lam": _NON_NEGATIVE},
        ),
        LossSpec(
            "dpop",
            "DPOP",
            _LOG_SIG,
            r"$r_w - \lambda\max(0, -r_w)$",
            _R_L,
            "0",
            rf"$\beta{_S}(1 + \lambda 1[r_w < 0])$",
            rf"$\beta{_S}$",
            False,
            {"beta": 0.1, "lam": 50.0},
            _dpop_loss,
            _dpop_coef,
            {"beta": _POSITIVE, "lam": _NON_NEGATIVE},
        ),
        LossSpec(
            "rrhf",
            "RRHF",
            r"$-\max(0, -D)$",
            r"$u_w/|y_w|$",
            r"$u_l/|y_l|$",
            r"$\lambda u_w$ (NLL)",
            r"$1[D < 0]/|y_w| + \lambda$",
            r"$1[D < 0]/|y_l|$",
            False,
            {"lam": 1.0},
            _rrhf_loss,
            _rrhf_coef,
            {"lam": _NON_NEGATIVE},
        ),
        LossSpec(
            "orpo",
            "ORPO",
            r"$\lambda\log\sigma(D)$",
            r"$\log\frac{p_w}{1-p_w}$, $p_w = e^{u_w/|y_w|}$",
            r"$\log\frac{p_l}{1-p_l}$, $p_l = e^{u_l/|y_l|}$",
            r"$u_w/|y_w|$ (NLL)",
            r"$\frac{\lambda\sigma(-D)}{(1-p_w)|y_w|} + \frac{1}{|y_w|}$",
            r"$\frac{\lambda\sigma(-D)}{(1-p_l)|y_l|}$",
            False,
            {"lam": 0.1},
            _orpo_loss,
            _orpo_coef,
            {"lam": _NON_NEGATIVE},
        ),
        LossSpec(
            "sppo",
            "SPPO (hard)",
            r"separable: $-(r_w - \frac{1}{2\beta})^2 - (r_l + \frac{1}{2\beta})^2$",
            _R_W,
            _R_L,
            "0",
            r"$2(\frac{1}{2\beta} - r_w)$",
            r"$2(r_l + \frac{1}{2\beta})$",
            True,
            {"beta": 0.1},
            _sppo_loss,
            _sppo_coef,
            {"beta": _POSITIVE},
        ),
        LossSpec(
            "kto_pair",
            "KTO (pairwise)",
            r"separable: $\sigma(\beta r_w) + \sigma(-\beta r_l)$ (reference point 0)",
            _R_W,
            _R_L,
            "0",
            r"$\beta\sigma(\beta r_w)\sigma(-\beta r_w)$",
            r"$\beta\sigma(\beta r_l)\sigma(-\beta r_l)$",
            True,
            {"beta": 0.1},
            _kto_loss,
            _kto_coef,
            {"beta": _POSITIVE},
        ),
    ]
}

LOSS_NOTES = {
    "rdpo": "z = beta D - alpha (|y_w| - |y_l|), as in Park et al. (2024).",
    "simpo": "beta 2.0 and gamma 0.5 on length-averaged log-probs (SimPO's recommended range).",
    "slic": "hinge margin delta 1.0; the regularizer is lambda times the summed chosen log-prob.",
    "cpo": "the NLL term is the summed chosen log-prob (CPO averages it over tokens).",
    "rrhf": "ranking hinge on length-averaged log-probs plus lambda times the chosen NLL.",
    "orpo": "odds of the length-averaged probability; the NLL term is length-averaged.",
    "kto_pair": "KTO's reference point (a KL estimate) is set to 0 for a per-pair loss.",
}


def _check_value(loss: str, key: str, value: object, constraint: str | None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{loss}: hyperparameter {key!r} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{loss}: hyperparameter {key!r} must be finite, got {value}")
    if constraint == _POSITIVE and value <= 0:
        raise ValueError(f"{loss}: hyperparameter {key!r} {constraint}, got {value}")
    if constraint == _NON_NEGATIVE and value < 0:
        raise ValueError(f"{loss}: hyperparameter {key!r} {constraint}, got {value}")
    return value


def get_loss(name: str, **hparams: float) -> MarginLoss:
    """The loss ``name`` with its defaults overridden by ``hparams`` (validated)."""
    if not isinstance(name, str) or name.lower() not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(LOSSES)}")
    spec = LOSSES[name.lower()]
    for key in hparams:
        if key not in spec.defaults:
            allowed = ", ".join(spec.defaults) or "none"
            raise ValueError(f"{spec.name}: unknown hyperparameter {key!r}; allowed: {allowed}")
    params = {
        key: _check_value(spec.name, key, hparams.get(key, default), spec.constraints.get(key))
        for key, default in spec.defaults.items()
    }
    return MarginLoss(spec, params)


def autograd_coefficients(loss: MarginLoss, p: PairLogps) -> tuple[Tensor, Tensor]:
    """``(d_w, d_l)`` by differentiating the loss: ``d_w = -dL/du_w``, ``d_l = dL/du_l``."""
    u_w = p.chosen.detach().clone().requires_grad_(True)
    u_l = p.rejected.detach().clone().requires_grad_(True)
    q = PairLogps(u_w, u_l, p.ref_chosen, p.ref_rejected, p.len_chosen, p.len_rejected)
    g_w, g_l = torch.autograd.grad(loss.loss(q).sum(), (u_w, u_l))
    return -g_w, g_l


def table2() -> pd.DataFrame:
    """The family as the paper's Table 2: one row per loss (LaTeX strings) with its defaults."""
    rows = []
    for spec in LOSSES.values():
        rows.append(
            {
                "loss": spec.title,
                "m(D)": spec.m,
                "h_w": spec.h_w,
                "h_l": spec.h_l,
                "Lambda(u_w)": spec.Lambda,
                "d_w": spec.d_w,
                "d_l": spec.d_l,
                "separable": spec.separable,
                "defaults": ", ".join(f"{k}={v:g}" for k, v in spec.defaults.items()),
                "note": LOSS_NOTES.get(spec.name, ""),
            }
        )
    return pd.DataFrame(rows).set_index("loss")
