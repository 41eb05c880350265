"""Statistics strategies: one interface, :class:`StatsComputer`, and its implementations
registered by name (``exact``: per-sequence backward passes, the reference; ``fast``: one
forward and one backward with the :class:`~ge_utils.stats.recorder.GhostRecorder`).

Every strategy answers two questions about B pairs (chosen row i with rejected row i):

- :meth:`StatsComputer.pair_stats`: the statistics ``|g_w|^2, |g_l|^2, <g_w, g_l>`` and the
  log-probs at the current parameters, in eval mode (:class:`~ge_utils.stats.record.PairStats`);
- :meth:`StatsComputer.training_step`: one training forward and ``loss.backward()`` (parameter
  ``.grad`` accumulate as usual) of a loss ``L(u_w, u_l)`` that depends on the parameters only
  through the summed log-probs, and the same statistics at the parameters of that step, with
  the coefficients ``c = dL/du`` (for a margin loss averaged over n pairs ``-d_w / n`` and
  ``+d_l / n``). The model's mode is left as it is (dropout, if on, is part of the gradients).

Register another strategy with ``@register_strategy("name")`` on a :class:`StatsComputer`
subclass; :func:`get_strategy` returns an instance by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ge_utils.logprobs import SequenceBatch, concat_batches, eval_mode, sequence_logprobs
from ge_utils.stats.exact import exact_gradient_stats
from ge_utils.stats.params import ParamSpec
from ge_utils.stats.record import PairStats
from ge_utils.stats.recorder import GhostRecorder

LossOfLogps = Callable[[Tensor, Tensor], Tensor]


def _check_pairs(chosen: SequenceBatch, rejected: SequenceBatch) -> None:
    if len(chosen) != len(rejected):
        raise ValueError(f"{len(chosen)} chosen but {len(rejected)} rejected sequences")


def _scalar(loss: Tensor) -> Tensor:
    if loss.dim() != 0:
        raise ValueError(f"loss_of_logps must return a scalar, got shape {tuple(loss.shape)}")
    return loss


class StatsComputer(ABC):
    """A way to compute per-pair gradient statistics (see the module docstring)."""

    name: str = ""

    @abstractmethod
    def pair_stats(
        self,
        model: nn.Module,
        chosen: SequenceBatch,
        rejected: SequenceBatch,
        params: ParamSpec = None,
    ) -> PairStats:
        """Statistics and log-probs of every pair at the current parameters, in eval mode."""

    def training_step(
        self,
        model: nn.Module,
        chosen: SequenceBatch,
        rejected: SequenceBatch,
        loss_of_logps: LossOfLogps,
        params: ParamSpec = None,
    ) -> tuple[Tensor, PairStats]:
        """The detached loss of one training forward and backward, and the statistics of the
        step's pairs with their coefficients. This default runs the training backward, then
        :meth:`pair_stats` at the same (not yet updated) parameters."""
        _check_pairs(chosen, rejected)
        b = len(chosen)
        u = sequence_logprobs(model, concat_batches(chosen, rejected))
        loss = _scalar(loss_of_logps(u[:b], u[b:]))
        (coef,) = torch.autograd.grad(loss, u, retain_graph=True)
        loss.backward()
        stats = self.pair_stats(model, chosen, rejected, params)
        c = coef.detach().double().cpu()
        return loss.detach(), PairStats(**{**stats, "coef_chosen": c[:b], "coef_rejected": c[b:]})


_STRATEGIES: dict[str, type[StatsComputer]] = {}


def register_strategy(name: str) -> Callable[[type[StatsComputer]], type[StatsComputer]]:
    """Class decorator: make a :class:`StatsComputer` available as ``get_strategy(name)``."""

    def decorate(cls: type[StatsComputer]) -> type[StatsComputer]:
        cls.name = name
        _STRATEGIES[name] = cls
        return cls

    return decorate


def strategy_names() -> tuple[str, ...]:
    return tuple(_STRATEGIES)


def get_strategy(name: str) -> StatsComputer:
    """The registered strategy ``name`` (``exact`` or ``fast`` unless more are registered)."""
    if name not in _STRATEGIES:
        known = " or ".join(repr(n) for n in _STRATEGIES)
        raise ValueError(f"unknown statistics method {name!r}; expected {known}")
    return _STRATEGIES[name]()


@register_strategy("exact")
class ExactStats(StatsComputer):
    """One backward pass per sequence, float64 products:
    :func:`ge_utils.stats.exact.exact_gradient_stats`."""

    def pair_stats(self, model, chosen, rejected, params=None) -> PairStats:
        return exact_gradient_stats(model, chosen, rejected, params)


@register_strategy("fast")
class FastStats(StatsComputer):
    """One forward and one backward over the 2B sequences with a
    :class:`~ge_utils.stats.recorder.GhostRecorder`; in a training step, the training backward
    itself (output gradients scaled by ``c``, divided out). ``group``: the recorder's number of
    layers reduced together (None: its default for the device)."""

    def __init__(self, group: int | None = None):
        self.group = group

    def pair_stats(self, model, chosen, rejected, params=None) -> PairStats:
        _check_pairs(chosen, rejected)
        joint = concat_batches(chosen, rejected)
        with eval_mode(model):
            with GhostRecorder(model, params, batch=joint, group=self.group) as rec:
                u = sequence_logprobs(model, joint)
                rec.backward(u.sum())
                stats = rec.pair_stats()
        b = len(chosen)
        return stats.with_logps(u[:b], u[b:])

    def training_step(self, model, chosen, rejected, loss_of_logps, params=None):
        _check_pairs(chosen, rejected)
        joint = concat_batches(chosen, rejected)
        b = len(chosen)
        recorder = GhostRecorder(model, params, keep_outputs=False, batch=joint, group=self.group)
        with recorder as rec:
            u = sequence_logprobs(model, joint)
            loss = _scalar(loss_of_logps(u[:b], u[b:]))
            (coef,) = torch.autograd.grad(loss, u, retain_graph=True)
            rec.check_uses(loss)
            loss.backward()
            stats = rec.pair_stats(coef[:b], coef[b:])
        return loss.detach(), stats.with_logps(u[:b], u[b:])


def fast_gradient_stats(
    model: nn.Module,
    chosen: SequenceBatch,
    rejected: SequenceBatch,
    params: ParamSpec = None,
    group: int | None = None,
) -> PairStats:
    """Same result as :func:`ge_utils.stats.exact.exact_gradient_stats`, from one forward and one
    backward over the 2B sequences (``get_strategy("fast")``). Eval mode; parameter ``.grad``
    fields are left untouched. ``group``: layers reduced together
    (:class:`~ge_utils.stats.recorder.GhostRecorder`; None: 1 on the CPU, more elsewhere)."""
    return FastStats(group).pair_stats(model, chosen, rejected, params)


def training_step_stats(
    model: nn.Module,
    chosen: SequenceBatch,
    rejected: SequenceBatch,
    loss_of_logps: LossOfLogps,
    params: ParamSpec = None,
) -> tuple[Tensor, PairStats]:
    """One training forward and ``loss.backward()`` that also yields every pair's statistics
    from that same backward (``get_strategy("fast").training_step``): the detached loss and
    :class:`PairStats` with ``coef_chosen``, ``coef_rejected``; a pair with a coefficient below
    ``TINY_COEFFICIENT`` in size (e.g. a hinge loss already satisfied) gets NaN statistics."""
    return FastStats().training_step(model, chosen, rejected, loss_of_logps, params)
