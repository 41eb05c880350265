"""Per-pair gradient statistics ``|g_w|^2, |g_l|^2, <g_w, g_l>`` without materializing
gradients, and the exact reference they are tested against.

Layout (each module imports only those above it)::

    params      the parameter set (ParamSpec, parameter_set)
    record      PairStats, the result record
    exact       exact_gradient_stats: one backward per sequence (the reference)
    factors     Factor (per-sequence gradient factors of one use of a parameter), their products
    layers      per-layer factor functions, registered per module type (register_layer)
    moe         those of mixture-of-experts routers and experts (registered on import)
    attention   that of GPT-OSS's attention sinks (registered on import)
    recorder    GhostRecorder: hooks on the owning modules, accumulation of the products
    strategies  StatsComputer with the 'exact' and 'fast' strategies (get_strategy)
    tokenwise   tokenwise_inner: token-by-token products of one pair

For a linear layer ``y_r = W a_r`` and a scalar ``f_i`` that depends on rows ``r`` of sequence i,
``grad_W f_i = sum_r g_r a_r^T`` with ``g_r = d f_i / d y_r``, hence

    <grad_W f_i, grad_W f_j> = sum_{r in i, s in j} (a_r . a_s) (g_r . g_s)

which needs only the layer's inputs and output gradients. One forward and one backward of
``sum_i f_i`` over a batch give every sequence's rows, because sequences do not interact.
"""

import ge_utils.stats.attention  # registers its layer rule
import ge_utils.stats.moe  # noqa: F401  (registers its layer rules)
from ge_utils.stats.exact import exact_gradient_stats
from ge_utils.stats.factors import Factor
from ge_utils.stats.layers import register_layer
from ge_utils.stats.params import ParamSpec, parameter_set
from ge_utils.stats.record import PAIR_KEYS, STAT_KEYS, PairStats
from ge_utils.stats.recorder import TINY_COEFFICIENT, GhostRecorder
from ge_utils.stats.strategies import (
    StatsComputer,
    fast_gradient_stats,
    get_strategy,
    register_strategy,
    strategy_names,
    training_step_stats,
)
from ge_utils.stats.tokenwise import tokenwise_inner

__all__ = [
    "PAIR_KEYS",
    "STAT_KEYS",
    "TINY_COEFFICIENT",
    "Factor",
    "GhostRecorder",
    "PairStats",
    "ParamSpec",
    "StatsComputer",
    "exact_gradient_stats",
    "fast_gradient_stats",
    "get_strategy",
    "parameter_set",
    "register_layer",
    "register_strategy",
    "strategy_names",
    "tokenwise_inner",
    "training_step_stats",
]
