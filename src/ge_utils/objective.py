"""One interface for whatever preference optimization trains: :class:`Objective`.

An objective turns one micro-batch of preference pairs into a loss and back-propagates it (its
*micro-step*), and says what it needs around that step:

- reference log-probs: every objective gets the summed ``u_ref`` of chosen and rejected (the
  model's at the start of preference optimization); with ``needs_token_reference`` it also gets
  the per-token ``l_t^ref = log pi_ref(y_t | x, y_<t)`` (a token mask needs them);
- parameters of its own (a learned token mask): :meth:`Objective.prepare` creates them for a
  model and the token ids of the training responses, :meth:`Objective.param_group` hands them to
  the optimizer, which trains them with the model;
- ``reports_pair_stats``: whether its micro-step can return every pair's gradient statistics
  recovered from its own backward (``record_stats``);
- ``logged``: the margin loss (a :class:`PairLoss`) whose per-pair loss and ``(d_w, d_l)`` the
  training logs report (a mitigation logs DPO with its ``beta`` on the unmasked log-probs, so
  histories compare);
- :meth:`Objective.log_frames`: tables of its own, logged at every logged step (a learned mask's
  token weights).

Micro-step contract (:meth:`Objective.microstep`): ``chosen`` and ``rejected`` are batches of B
pairs (row i of each is pair i), ``ref`` their (B,) summed reference log-probs, ``ref_tokens``
(B, T) per-token references at the response positions (0 elsewhere) or None. The step
back-propagates ``sum_i loss_i / n_total`` (gradients accumulate in ``.grad``, so micro-batches
of one optimizer step add up to the mean over its ``n_total`` pairs) and returns the detached
``sum_i loss_i / n_total``, the (B,) summed log-probs ``u_w`` and ``u_l`` and, with
``record_stats``, a dict of per-pair statistics (``logp_chosen``, ``logp_rejected``, ``d_w``,
``d_l`` and the gradient statistics of :data:`ge_utils.stats.PAIR_KEYS`), else None. A NaN or
infinite loss raises ``FloatingPointError(value)`` before any backward.

What a loss reads of a pair is a :class:`PairLogps` (built by :func:`pair_logps`): summed
log-probs ``u = log pi(y|x)`` (nats), reference log-probs and response lengths ``|y|``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar, Protocol

import pandas as pd
from torch import Tensor, nn

from ge_utils.logprobs import SequenceBatch

MicrostepResult = tuple[Tensor, Tensor, Tensor, dict[str, Tensor] | None]


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
        """(B,) ``r_w = u_w - u_w^ref``."""
        return self.chosen - self.ref_chosen

    @property
    def reward_rejected(self) -> Tensor:
        """(B,) ``r_l = u_l - u_l^ref``."""
        return self.rejected - self.ref_rejected


def pair_logps(
    u_w: Tensor,
    u_l: Tensor,
    chosen: SequenceBatch | Tensor,
    rejected: SequenceBatch | Tensor,
    ref: tuple[Tensor, Tensor] | None = None,
) -> PairLogps:
    """Bundle (B,) summed log-probs with references and lengths for a loss. ``chosen`` and
    ``rejected`` are the batches (their response lengths are used) or (B,) lengths; without
    ``ref`` the reference is the policy itself (rewards 0)."""
    ref_w, ref_l = ref if ref is not None else (u_w.detach(), u_l.detach())
    len_w, len_l = (
        b.response_lengths if isinstance(b, SequenceBatch) else b for b in (chosen, rejected)
    )
    return PairLogps(u_w, u_l, ref_w.to(u_w), ref_l.to(u_l), len_w.to(u_w), len_l.to(u_l))


class PairLoss(Protocol):
    """A per-pair loss of :class:`PairLogps` with closed-form coefficients."""

    def loss(self, p: PairLogps) -> Tensor:
        """(B,) per-pair loss, to be minimized."""
        ...

    def coefficients(self, p: PairLogps) -> tuple[Tensor, Tensor]:
        """``(d_w, d_l)``, each (B,): ``d_w = -dloss/du_w``, ``d_l = dloss/du_l``."""
        ...


class Objective(ABC):
    """A training objective of preference optimization (see the module docstring)."""

    needs_token_reference: ClassVar[bool] = False
    reports_pair_stats: ClassVar[bool] = True

    @property
    @abstractmethod
    def name(self) -> str:
        """The registry name (``dpo``, ``masked_dpo``, ...)."""

    @property
    @abstractmethod
    def logged(self) -> PairLoss:
        """The margin loss whose loss and coefficients the training logs report."""

    @abstractmethod
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
        """Forward and backward of one micro-batch (the contract in the module docstring)."""

    def prepare(self, model: nn.Module, token_ids: Iterable[int]) -> None:
        """Create the objective's own parameters for ``model``; ``token_ids``: the ids of the
        training responses (those a learned mask reports). Nothing by default."""
        return None

    def param_group(self) -> dict | None:
        """An optimizer parameter group for the objective's own parameters, or None."""
        return None

    def log_frames(self, step: int, decode: Callable[[list[int]], str]) -> dict[str, pd.DataFrame]:
        """Tables of the objective's own at a logged ``step`` (``decode``: ids -> text), by
        name; none by default."""
        return {}
