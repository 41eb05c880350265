"""Fast exact gradient inner products ("ghost" products): the public names of
:mod:`ge_utils.stats`, kept under this module's name for existing imports.

The implementation lives in :mod:`ge_utils.stats`: the per-layer factor functions in
:mod:`ge_utils.stats.layers` (how to add a layer type is in its docstring), the recorder in
:mod:`ge_utils.stats.recorder`, the strategies in :mod:`ge_utils.stats.strategies` and the
token-wise products in :mod:`ge_utils.stats.tokenwise`.
"""

from ge_utils.stats.record import PAIR_KEYS, PairStats
from ge_utils.stats.recorder import TINY_COEFFICIENT, GhostRecorder
from ge_utils.stats.strategies import fast_gradient_stats, training_step_stats
from ge_utils.stats.tokenwise import tokenwise_inner

__all__ = [
    "PAIR_KEYS",
    "TINY_COEFFICIENT",
    "GhostRecorder",
    "PairStats",
    "fast_gradient_stats",
    "tokenwise_inner",
    "training_step_stats",
]
