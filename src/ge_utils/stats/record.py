""":class:`PairStats`, the per-pair result of every statistics strategy."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

PAIR_KEYS = ("norm2_chosen", "norm2_rejected", "inner")
STAT_KEYS = ("logp_chosen", "logp_rejected", *PAIR_KEYS)


@dataclass(frozen=True, eq=False)
class PairStats(Mapping[str, Tensor]):
    """Gradient statistics of B pairs, each field a float64 (B,) tensor on the CPU.

    With ``g_w = grad u_w`` and ``g_l = grad u_l`` the gradients of the summed response
    log-probs of pair i's chosen and rejected sequence over a parameter set:
    ``norm2_chosen = |g_w|^2``, ``norm2_rejected = |g_l|^2``, ``inner = <g_w, g_l>``,
    ``logp_chosen = u_w``, ``logp_rejected = u_l`` (nats). After a training backward,
    ``coef_chosen`` and ``coef_rejected`` hold the loss coefficients ``dLoss/du`` that the
    backward carried (``-d_w / n`` and ``+d_l / n`` for a margin loss averaged over n pairs).
    Fields that a computation does not produce are None.

    Read it by attribute (``stats.inner``) or, as a read-only mapping of its present fields,
    by key (``stats["inner"]``, ``dict(stats)``).
    """

    norm2_chosen: Tensor
    norm2_rejected: Tensor
    inner: Tensor
    logp_chosen: Tensor | None = None
    logp_rejected: Tensor | None = None
    coef_chosen: Tensor | None = None
    coef_rejected: Tensor | None = None

    def __post_init__(self) -> None:
        sizes = {f.name: len(v) for f in fields(self) if (v := getattr(self, f.name)) is not None}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"PairStats fields differ in length: {sizes}")

    def __getitem__(self, key: str) -> Tensor:
        value = getattr(self, key, None) if key in self._names() else None
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return (n for n in self._names() if getattr(self, n) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @property
    def n_pairs(self) -> int:
        return len(self.inner)

    def select(self, index: Sequence[int]) -> PairStats:
        """The pairs ``index`` (positions into the B pairs), in that order."""
        rows = torch.as_tensor(list(index), dtype=torch.long)
        return replace(self, **{k: v[rows] for k, v in self.items()})

    def with_logps(self, logp_chosen: Tensor, logp_rejected: Tensor) -> PairStats:
        """A copy with the log-probs set (detached float64 on the CPU)."""
        return replace(
            self,
            logp_chosen=logp_chosen.detach().double().cpu(),
            logp_rejected=logp_rejected.detach().double().cpu(),
        )
