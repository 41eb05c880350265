"""The paper's two mitigations of gradient entanglement, stated precisely and trainable.

The paper names them without formulas (and its authors released no code); these are our
definitions. Notation as in :mod:`ge_utils.losses`: ``u = log pi(y|x)`` summed over response
tokens (nats), ``r = u - u_ref``, ``g = grad u``.

**Pairwise normalized preference optimization** (``normalized_dpo``). Each pair moves along

    c (g_w / |g_w| - g_l / |g_l|),   c = beta sigmoid(-beta (r_w - r_l))   (the DPO weight),

and a batch step is the mean of these directions over its pairs. One step of size ``eta`` on a
pair alone changes, to first order,

    Delta u_w = eta c |g_w| (1 - cos),   Delta u_l = -eta c |g_l| (1 - cos),

with ``cos`` the cosine of ``g_w, g_l``: chosen up and rejected down for *any* inner product,
unless ``cos = 1``. (Between different pairs of a batch nothing is guaranteed.) It is computed
from one forward: a backward to the layer outputs gives every ``|g|^2``
(:class:`ge_utils.fast_gradients.GhostRecorder`, no parameter gradient is formed), then the
surrogate ``L = -(1/n) sum_i c_i (u_w,i / |g_w,i| - u_l,i / |g_l,i|)`` (``c`` and the norms held
constant) is back-propagated through the same graph: its gradient is minus the mean direction.

**Sparse token masking** (``masked_dpo`` learned, ``oracle_masked_dpo``). The margin is put on
token-weighted rewards. With per-token log-probs ``l_t = log pi(y_t|x, y_<t)``, rewards
``rho_t = l_t - l_t^ref`` and weights ``m_t`` in [0, 1], the model is trained on

    loss_model = -log sigmoid(beta D_m),   D_m = sum_t m_t rho_t(y_w) - sum_t m_t rho_t(y_l)

(the mask held fixed). *Oracle*: ``m_t = 1`` where the chosen and rejected tokens differ
(responses aligned from their first token; every position past the shorter one), 0 elsewhere: on
the sentiment task, only the ``Positive``/``Negative`` token. *Learned*: ``m_t = sigmoid(a[y_t])``,
one logit per vocabulary id (shared by every position and pair, so the mask is a readable list
of token weights), all starting at ``mask_init``. The mask is trained, with the model held fixed,
to explain the preference with as few tokens as possible under the current policy:

    loss_mask = -log sigmoid(beta sum_t m_t (l_t(y_w)) - beta sum_t m_t l_t(y_l))
                + lam (mean_t m_t(y_w) + mean_t m_t(y_l)) / 2

(rewards would not do: they are all 0 at the start, so the mask would get no signal). The L1 term
(``m >= 0``: the mean weight) drives tokens that do not separate chosen from rejected to 0; both
losses are minimized together, the mask by the same optimizer at learning rate ``mask_lr``.
Tokens with ``m_t = 0`` are no longer trained.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ge_utils.fast_gradients import GhostRecorder, fast_gradient_stats
from ge_utils.gradients import parameter_set
from ge_utils.logprobs import (
    SequenceBatch,
    concat_batches,
    eval_mode,
    sequence_logprobs,
    token_logprobs,
    unwrap_model,
)
from ge_utils.losses import (
    NON_NEGATIVE,
    OPEN_UNIT,
    POSITIVE,
    MarginLoss,
    bind_hyperparameters,
    get_loss,
)
from ge_utils.objective import MicrostepResult, Objective, pair_logps


@dataclass(frozen=True)
class MitigationSpec:
    """A mitigation's name, description, default hyperparameters and their constraints."""

    name: str
    title: str
    description: str
    defaults: dict[str, float]
    constraints: dict[str, str]


MITIGATIONS: dict[str, MitigationSpec] = {
    spec.name: spec
    for spec in [
        MitigationSpec(
            "normalized_dpo",
            "Pairwise normalized DPO",
            "Each pair steps along c (g_w/|g_w| - g_l/|g_l|) with the DPO weight c.",
            {"beta": 0.1},
            {"beta": POSITIVE},
        ),
        MitigationSpec(
            "masked_dpo",
            "Sparse token-masked DPO (learned mask)",
            "DPO on token-weighted rewards; one sigmoid weight per vocabulary id, learned to "
            "separate chosen from rejected with few tokens (L1).",
            {"beta": 0.1, "lam": 0.1, "mask_lr": 0.25, "mask_init": 0.5},
            {"beta": POSITIVE, "lam": NON_NEGATIVE, "mask_lr": POSITIVE, "mask_init": OPEN_UNIT},
        ),
        MitigationSpec(
            "oracle_masked_dpo",
            "Token-masked DPO (oracle mask)",
            "DPO on the rewards of the tokens where chosen and rejected differ only.",
            {"beta": 0.1},
            {"beta": POSITIVE},
        ),
    ]
}


def is_mitigation(name: object) -> bool:
    return isinstance(name, str) and name.lower() in MITIGATIONS


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


def _checked(loss: Tensor) -> Tensor:
    if not torch.isfinite(loss):
        raise FloatingPointError(float(loss.detach()))
    return loss


class Mitigation(Objective):
    """A training objective that is not a plain margin loss of the summed log-probs.

    ``base`` is DPO with the same ``beta``, the objective's ``logged`` loss: the training loop
    logs its loss and coefficients on the *unmasked* summed log-probs, so histories compare with
    every other loss. Per-pair statistics only where a subclass says so.
    """

    reports_pair_stats = False

    def __init__(self, spec: MitigationSpec, hyperparameters: dict[str, float]):
        self.spec = spec
        self.hyperparameters = hyperparameters
        self.base: MarginLoss = get_loss("dpo", beta=hyperparameters["beta"])

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def logged(self) -> MarginLoss:
        return self.base

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v:g}" for k, v in self.hyperparameters.items())
        return f"{self.name}({args})"


class NormalizedDPO(Mitigation):
    """Pairwise normalized DPO (see the module docstring)."""

    reports_pair_stats = True

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
        """One forward; the DPO loss is reported, the normalized surrogate back-propagated."""
        joint = concat_batches(chosen, rejected)
        b = len(chosen)
        with GhostRecorder(model, batch=joint) as rec:
            u = token_logprobs(model, joint).sum(dim=1)
            u_w, u_l = u[:b], u[b:]
            p = pair_logps(u_w, u_l, chosen, rejected, ref)
            loss = _checked(self.base.loss(p).sum() / n_total)
            rec.backward(u.sum(), retain_graph=True)
            stats = rec.results()
            c, _ = (d.detach() for d in self.base.coefficients(p))
            norm_w = stats["norm2_chosen"].sqrt().to(u)
            norm_l = stats["norm2_rejected"].sqrt().to(u)
            d_w, d_l = _ratio(c, norm_w), _ratio(c, norm_l)  # effective coefficients
            surrogate = -(d_w * u_w - d_l * u_l).sum() / n_total
            surrogate.backward()
        out = None
        if record_stats:
            out = {
                "logp_chosen": u_w.detach(),
                "logp_rejected": u_l.detach(),
                "d_w": d_w.detach(),
                "d_l": d_l.detach(),
                **stats,
            }
        return loss.detach(), u_w.detach(), u_l.detach(), out


def contrastive_mask(chosen: SequenceBatch, rejected: SequenceBatch) -> tuple[Tensor, Tensor]:
    """Oracle masks, (B, T_w) and (B, T_l) float: 1 at the response positions whose token
    differs from the other response's token at the same response index (and past the shorter
    response), 0 elsewhere (prompt and padding included)."""
    masks = []
    for this, other in ((chosen, rejected), (rejected, chosen)):
        out = torch.zeros(this.input_ids.shape, dtype=torch.float64, device=this.input_ids.device)
        for i in range(len(this)):
            pos = this.response_mask[i].nonzero().flatten()
            mine = this.input_ids[i, pos]
            theirs = other.input_ids[i, other.response_mask[i]]
            n = min(len(mine), len(theirs))
            differs = torch.ones(len(mine), dtype=torch.bool, device=mine.device)
            differs[:n] = mine[:n] != theirs[:n]
            out[i, pos] = differs.to(out.dtype)
        masks.append(out)
    return masks[0], masks[1]


class MaskedDPO(Mitigation):
    """Sparse token-masked DPO, learned or oracle (see the module docstring)."""

    needs_token_reference = True

    def __init__(self, spec: MitigationSpec, hyperparameters: dict[str, float], oracle: bool):
        super().__init__(spec, hyperparameters)
        self.oracle = oracle
        self.logits: nn.Parameter | None = None  # created by prepare (vocabulary size)
        self.reported_ids: list[int] = []  # the token ids whose weights log_frames reports

    def ensure_parameters(self, vocab_size: int, device: torch.device | str) -> None:
        """Create the mask logits (one per vocabulary id) if this is the learned variant."""
        if self.oracle or self.logits is not None:
            return
        init = self.hyperparameters["mask_init"]
        value = math.log(init / (1 - init))
        self.logits = nn.Parameter(torch.full((vocab_size,), value, device=device))

    def prepare(self, model: nn.Module, token_ids: Iterable[int]) -> None:
        """Learned variant: one mask logit per vocabulary id of ``model``'s output layer; the
        weights of ``token_ids`` (sorted, once each) are reported at every logged step."""
        if self.oracle:
            return
        vocab = unwrap_model(model).get_output_embeddings().weight.shape[0]
        self.ensure_parameters(vocab, next(model.parameters()).device)
        self.reported_ids = sorted(set(token_ids))

    def log_frames(self, step: int, decode: Callable[[list[int]], str]) -> dict[str, pd.DataFrame]:
        """``mask``: ``step, token_id, token, weight`` of every reported token id."""
        if not self.reported_ids:
            return {}
        ids = self.reported_ids
        weights = self.token_weights()[ids].cpu().double().numpy()
        tokens = [decode([t]) for t in ids]
        frame = pd.DataFrame({"step": step, "token_id": ids, "token": tokens, "weight": weights})
        return {"mask": frame}

    def param_group(self) -> dict | None:
        if self.logits is None:
            return None
        return {"params": [self.logits], "lr": self.hyperparameters["mask_lr"], "weight_decay": 0}

    def weights(self, chosen: SequenceBatch, rejected: SequenceBatch) -> tuple[Tensor, Tensor]:
        """Token weights ``m``, (B, T_w) and (B, T_l), 0 outside the responses."""
        if self.oracle:
            return contrastive_mask(chosen, rejected)
        if self.logits is None:
            raise RuntimeError("call ensure_parameters(vocab_size, device) first")
        return tuple(  # type: ignore[return-value]
            torch.sigmoid(self.logits[b.input_ids]) * b.response_mask for b in (chosen, rejected)
        )

    def token_weights(self) -> Tensor:
        """(V,) current weight of every vocabulary id (learned variant)."""
        if self.logits is None:
            raise RuntimeError("the oracle mask has no per-token weights")
        return torch.sigmoid(self.logits.detach())

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
        """DPO on the masked token rewards (and, learned, the mask's own loss); no statistics."""
        if ref_tokens is None:
            raise ValueError(f"{self.name} needs per-token reference log-probs (ref_tokens)")
        joint = concat_batches(chosen, rejected)
        b = len(chosen)
        lp = token_logprobs(model, joint)
        lp_w, lp_l = lp[:b, : chosen.input_ids.shape[1]], lp[b:, : rejected.input_ids.shape[1]]
        m_w, m_l = (m.to(lp) for m in self.weights(chosen, rejected))
        rho_w, rho_l = lp_w - ref_tokens[0].to(lp), lp_l - ref_tokens[1].to(lp)
        beta = self.hyperparameters["beta"]
        margin = (m_w.detach() * rho_w).sum(1) - (m_l.detach() * rho_l).sum(1)
        per_pair = -F.logsigmoid(beta * margin)
        if not self.oracle:
            contrast = (m_w * lp_w.detach()).sum(1) - (m_l * lp_l.detach()).sum(1)
            mean_w = m_w.sum(1) / chosen.response_lengths.to(lp)
            mean_l = m_l.sum(1) / rejected.response_lengths.to(lp)
            l1 = self.hyperparameters["lam"] * (mean_w + mean_l) / 2
            per_pair = per_pair - F.logsigmoid(beta * contrast) + l1
        loss = _checked(per_pair.sum() / n_total)
        loss.backward()
        return loss.detach(), lp_w.sum(1).detach(), lp_l.sum(1).detach(), None


_BUILDERS: dict[str, Callable[[MitigationSpec, dict[str, float]], Mitigation]] = {
    "normalized_dpo": NormalizedDPO,
    "masked_dpo": lambda spec, h: MaskedDPO(spec, h, oracle=False),
    "oracle_masked_dpo": lambda spec, h: MaskedDPO(spec, h, oracle=True),
}


def get_mitigation(name: str, **hparams: float) -> Mitigation:
    """A fresh mitigation objective (a learned mask starts anew) with its hyperparameters
    checked like a loss's (:func:`ge_utils.losses.get_loss`)."""
    if not is_mitigation(name):
        raise ValueError(f"unknown mitigation {name!r}; known: {', '.join(MITIGATIONS)}")
    spec = MITIGATIONS[name.lower()]
    bound = bind_hyperparameters(spec.name, spec.defaults, spec.constraints, hparams)
    return _BUILDERS[spec.name](spec, bound)


def get_objective(name: str, **hparams: float) -> Objective:
    """A margin loss of :data:`ge_utils.losses.LOSSES` or a mitigation, by name."""
    if is_mitigation(name):
        return get_mitigation(name, **hparams)
    try:
        return get_loss(name, **hparams)
    except ValueError as exc:
        if isinstance(name, str) and "unknown loss" in str(exc):
            raise ValueError(f"{exc}; mitigations: {', '.join(MITIGATIONS)}") from None
        raise


def first_order_normalized(stats: dict[str, Tensor], c: Tensor, eta: float) -> dict[str, Tensor]:
    """Predicted ``Delta u_w = eta c |g_w| (1 - cos)`` and ``Delta u_l = -eta c |g_l| (1 - cos)``
    of one normalized step on each pair alone, from (B,) ``norm2_chosen``, ``norm2_rejected``,
    ``inner`` and the weights ``c`` (B,)."""
    nw, nl = stats["norm2_chosen"].sqrt(), stats["norm2_rejected"].sqrt()
    cos = stats["inner"] / (nw * nl)
    return {
        "pred_delta_chosen": eta * c * nw * (1 - cos),
        "pred_delta_rejected": -eta * c * nl * (1 - cos),
    }


def normalized_step_check(
    model: nn.Module,
    chosen: SequenceBatch,
    rejected: SequenceBatch,
    ref: tuple[Tensor, Tensor] | None = None,
    beta: float = 0.1,
    step_size: float = 1e-2,
) -> pd.DataFrame:
    """The normalized step's guarantee, checked against a realized step, one pair at a time.

    The guarantee's conditions: one plain gradient step, on one pair alone, small enough for
    first order. For each pair i, over every trainable parameter: ``g_w, g_l`` by autograd, the
    DPO weight ``c = beta sigmoid(-beta (r_w - r_l))`` (``ref`` None: rewards 0, ``c = beta/2``),
    then the plain SGD step ``theta += eta c (g_w/|g_w| - g_l/|g_l|)`` (a descent step on the
    normalized objective), the realized ``Delta u_w, Delta u_l`` and the first-order prediction
    ``eta c |g_w| (1 - cos)``, ``-eta c |g_l| (1 - cos)`` from the same gradients (float64); the
    parameters are restored bit-exactly after each pair. One ``eta`` for all pairs: the median
    predicted ``Delta u_w`` is ``step_size`` nats (from :func:`fast_gradient_stats`).

    Returns one row per pair: ``pair, cosine, weight, eta, pred_delta_chosen,
    pred_delta_rejected, realized_delta_chosen, realized_delta_rejected`` (nats) and ``holds``
    (realized chosen up and rejected down). Eval mode throughout.
    """
    if len(chosen) != len(rejected) or len(chosen) == 0:
        raise ValueError(
            f"need as many chosen as rejected sequences (>= 1), got "
            f"{len(chosen)} and {len(rejected)}"
        )
    if not (math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"step_size must be a finite number > 0, got {step_size!r}")
    base = get_loss("dpo", beta=beta)
    stats = fast_gradient_stats(model, chosen, rejected)
    weight = (
        base.coefficients(
            pair_logps(stats["logp_chosen"], stats["logp_rejected"], chosen, rejected, ref)
        )[0]
        .double()
        .cpu()
    )
    unit = first_order_normalized(stats, weight, 1.0)["pred_delta_chosen"].median()
    if not float(unit) > 0:
        raise ValueError("every pair has cos(g_w, g_l) = 1 or a zero gradient: no step to check")
    eta = step_size / float(unit)
    plist = [q for _, q in parameter_set(model)]
    rows = []
    with eval_mode(model):
        for i in range(len(chosen)):
            c, r = chosen.select([i]), rejected.select([i])
            u_w, u_l = sequence_logprobs(model, c), sequence_logprobs(model, r)
            g_w = torch.autograd.grad(u_w.sum(), plist, allow_unused=True)
            g_l = torch.autograd.grad(u_l.sum(), plist, allow_unused=True)
            pairs = [
                (a.double(), b.double())
                for a, b in zip(g_w, g_l, strict=True)
                if a is not None and b is not None
            ]
            nw = math.sqrt(math.fsum(float((a * a).sum()) for a, _ in pairs))
            nl = math.sqrt(math.fsum(float((b * b).sum()) for _, b in pairs))
            cos = math.fsum(float((a * b).sum()) for a, b in pairs) / (nw * nl)
            w = float(weight[i])
            saved = [q.detach().clone() for q in plist]
            with torch.no_grad():
                try:
                    for q, a, b in zip(plist, g_w, g_l, strict=True):
                        step = torch.zeros_like(q)
                        if a is not None:
                            step += a / nw
                        if b is not None:
                            step -= b / nl
                        q.add_(eta * w * step)
                    new_w, new_l = sequence_logprobs(model, c), sequence_logprobs(model, r)
                finally:
                    for q, old in zip(plist, saved, strict=True):
                        q.copy_(old)
            d_w, d_l = float(new_w - u_w.detach()), float(new_l - u_l.detach())
            rows.append(
                {
                    "pair": i,
                    "cosine": cos,
                    "weight": w,
                    "eta": eta,
                    "pred_delta_chosen": eta * w * nw * (1 - cos),
                    "pred_delta_rejected": -eta * w * nl * (1 - cos),
                    "realized_delta_chosen": d_w,
                    "realized_delta_rejected": d_l,
                    "holds": d_w > 0 and d_l < 0,
                }
            )
    return pd.DataFrame(rows)


def scatter_response_tokens(batch: SequenceBatch, values: list[Tensor]) -> Tensor:
    """(B, T) tensor with ``values[i]`` (one value per response token of row i, in order) at
    row i's response positions, 0 elsewhere."""
    out = torch.zeros(batch.input_ids.shape, dtype=values[0].dtype, device=batch.input_ids.device)
    for i, v in enumerate(values):
        out[i, batch.response_mask[i]] = v.to(out.device)
    return out


def response_token_values(batch: SequenceBatch, per_token: Tensor) -> list[Tensor]:
    """Inverse of :func:`scatter_response_tokens`: row i's response-position values."""
    return [per_token[i, batch.response_mask[i]] for i in range(len(batch))]
