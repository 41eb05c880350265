"""Gradient-entanglement metrics in anyone's TRL ``DPOTrainer`` run (TRL >= 1.0).

    from ge_utils.trl_integration import attach_entanglement_metrics
    trainer = DPOTrainer(model=..., args=..., train_dataset=..., processing_class=tok)
    probe = [{"prompt": ..., "chosen": ..., "rejected": ...}, ...]   # a few held-out pairs
    callback = attach_entanglement_metrics(trainer, probe=probe)
    trainer.train()          # the logs now carry ge/* metrics; callback.pairs_frame() etc.

At every logging step (or every ``every`` optimizer steps) it adds to the trainer's logged
metrics (TRL's ``trainer._metrics``, averaged and logged by ``DPOTrainer.log``):

- over the pairs of that step's batch (all micro-batches of the optimizer step, all processes):
  ``ge/inner`` (mean ``<g_w, g_l>``), ``ge/cosine``, ``ge/norm2_chosen`` (``|g_w|^2``),
  ``ge/norm2_rejected`` (``|g_l|^2``), ``ge/inner_over_min_norm2`` (median), ``ge/d_w``,
  ``ge/d_l`` (mean loss coefficients), ``ge/case1_frac`` ... ``ge/case4_frac`` (first-order case
  of a plain gradient step on each pair, :func:`ge_utils.gradients.condition_table`) and
  ``ge/n_pairs``; ``g = grad log pi(y|x)`` over the trainable parameters (LoRA adapters only
  for a PEFT model; or those of ``params=``), at the parameters before the step's update;
- over a fixed probe set of pairs, or with ``probe=k`` over the first k pairs of the step's own
  batch (optional; at the same steps, or at every ``probe_every``-th step):
  ``ge/probe_pred_delta_chosen`` /
  ``ge/probe_pred_delta_rejected`` (mean first-order prediction ``g . Delta theta`` with the
  step's actual update ``Delta theta``, so it is honest under AdamW, weight decay and clipping
  included), ``ge/probe_real_delta_chosen`` / ``ge/probe_real_delta_rejected`` (mean realized
  change ``log pi after - log pi before`` of the step), ``ge/probe_sign_agree`` (fraction of
  probe responses whose predicted and realized changes have the same sign) and
  ``ge/probe_real_case1_frac`` ... ``ge/probe_real_case4_frac`` (realized cases);
- ``ge/seconds``: the time the integration spent on that step (its hooks inside the training
  backward are part of the step's own time and not counted).

Where the statistics come from: TRL's own forward and backward of the measured steps
(``in_backward=True``, the default). From the start of a measured step to its optimizer step, a
:class:`ge_utils.stats.GhostRecorder` on the policy records every layer of the backbone, and a hook
on the backbone's output recovers the fused LM head's share (TRL computes log-probs in chunks from
the head's weight directly, which module hooks cannot see): see :class:`_StepRecorder` for the
math. The hooks only read tensors, so training stays bit-identical with the integration on or off;
the statistics are those of the training forward (with its dropout, if on; TRL disables dropout by
default). A micro-batch whose backward is not that of a loss of the summed log-probs (checked per
token), a model whose output layer scales or soft-caps its logits, or a trainer that adds an
auxiliary loss to the backward (a mixture of experts' load-balancing loss of the router logits,
TRL's ``aux_loss_enabled``: its gradient reaches every layer but not the backbone's output, where
the check looks), goes through a separate pass instead (``in_backward=False`` for every step): just
before the optimizer step the captured micro-batch goes through
:func:`ge_utils.stats.fast_gradient_stats`, one forward and one backward to the layer outputs only,
in eval mode, which never touches ``.grad``, the optimizer or the RNG; it costs about one extra
training step. The probe costs, at each measured step, one forward and one backward of the probe
pairs just before the optimizer step (in eval mode, to the layer outputs only: ``.grad``
untouched), whose per-layer factors (inputs and output gradients) give the exact prediction ``g .
Delta theta`` once the update is known (for a linear layer ``sum_t g_t^T Delta W a_t``), and one
forward after the step. When the next step is measured too, that step's forward and backward of the
probe run right after this step's update instead (the parameters do not change until the next
optimizer step) and their log-probs are this step's "after": measuring every step costs one
forward, one backward and the contraction per step. A batch probe (``probe=k``: the displacement of
the pairs being trained on, the paper's object) needs neither: the recorder of the trainer's
backward also keeps the factors of those k pairs of the step's first micro-batch
(:meth:`ge_utils.stats.GhostRecorder.keep_rows`; they are ``c_i grad u_i``, divided by the loss
coefficient ``c_i`` after the contraction), and their log-probs before the step are those of the
training forward (hence a training forward without dropout is required: ``disable_dropout=True``,
TRL's default, and no functional dropout it does not reach, checked on one made-up sequence when
the callback is built, which also warns when ``disable_dropout`` left dropout on: then the
training, and its batch statistics, run with dropout); a step then costs the contraction, the copy
and one forward of the 2k sequences after the update. Where the recorder cannot handle the model, a
forward-mode pass (:func:`directional_logps`) instead. It needs a copy of the trainable parameters
before the step (small for LoRA, large for a full fine-tune), into which the update is then
computed; that memory is kept from the first probed step on and reused (until :meth:`detach`).

The loss coefficients ``d_w, d_l`` are those of TRL's ``loss_type="sigmoid"`` (DPO,
``ge_utils.losses.get_loss("dpo", beta=trainer.beta)``) with reference log-probs read from the
batch (``precompute_ref_log_probs``), or those the trainer itself computes in its loss (with
``trainer.ref_model``, or, for a PEFT model without a reference model, with the adapters
disabled), kept by a forward hook on that module: a measured step runs no reference forward of
its own. Pass ``loss=`` (a :class:`ge_utils.losses.MarginLoss`) for another loss of the family.
With one loss type, its weight (``loss_weights=[w]``) multiplies the coefficients; with several,
``loss=`` stands for their weighted sum. ``use_weighting`` (WPO: a weight of each pair's own) is
refused.

Several processes (``accelerate launch``, DDP): every process computes the statistics of its own
micro-batches and of its share of the probe pairs; the per-pair values are gathered from every
process (``accelerate.utils.gather_object``) before any mean is taken, so the logged numbers are
means over the global batch and the whole probe set, the same as one process with the same
global batch. DeepSpeed and FSDP (sharded parameters) are not supported.
"""

from __future__ import annotations

import contextlib
import math
import random
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from ge_utils.gradients import classify_cases, condition_table
from ge_utils.logprobs import (
    SequenceBatch,
    concat_batches,
    directional_logps,
    eval_mode,
    sequence_logprobs,
)
from ge_utils.losses import MarginLoss, PairLogps, get_loss
from ge_utils.models import device_clock
from ge_utils.stats import Factor, GhostRecorder, PairStats, fast_gradient_stats
from ge_utils.stats.params import ParamSpec, parameter_set
from ge_utils.stats.recorder import TINY_COEFFICIENT, KeptFactors, group_rows

PREFIX = "ge/"
BATCH_METRICS = (
    "inner",
    "cosine",
    "norm2_chosen",
    "norm2_rejected",
    "inner_over_min_norm2",
    "d_w",
    "d_l",
    "case1_frac",
    "case2_frac",
    "case3_frac",
    "case4_frac",
    "n_pairs",
)
PROBE_METRICS = (
    "probe_pred_delta_chosen",
    "probe_pred_delta_rejected",
    "probe_real_delta_chosen",
    "probe_real_delta_rejected",
    "probe_sign_agree",
    "probe_real_case1_frac",
    "probe_real_case2_frac",
    "probe_real_case3_frac",
    "probe_real_case4_frac",
)
METRIC_NAMES = tuple(PREFIX + k for k in (*BATCH_METRICS, *PROBE_METRICS, "seconds"))


@dataclass
class _MicroBatch:
    """A training micro-batch as the trainer's loss received it, and the reference log-probs
    (2B,) the trainer computed for it (None until then, or when it computes none)."""

    inputs: Mapping[str, Tensor]
    ref: Tensor | None = None
    stats: PairStats | None = None  # recorded in the trainer's own backward (all 2B rows)
    kept: _KeptPairs | None = None  # a batch probe's pairs, kept from that backward


@dataclass
class _KeptPairs:
    """A batch probe's pairs of a micro-batch, from the trainer's own forward and backward:
    their indices in the micro-batch, their log-probs ``logps`` (chosen rows first), the loss
    coefficients ``coef`` of the backward (same rows) and the kept factors of their gradients
    (each scaled by its coefficient)."""

    pairs: list[int]
    logps: Tensor
    coef: Tensor
    factors: KeptFactors


@dataclass
class ProbeBatch:
    """Tokenized probe pairs: row i of ``chosen`` pairs with row i of ``rejected``."""

    chosen: SequenceBatch
    rejected: SequenceBatch

    def __len__(self) -> int:
        return len(self.chosen)

    def select(self, index: Sequence[int]) -> ProbeBatch:
        return ProbeBatch(self.chosen.select(index), self.rejected.select(index))


def split_trl_batch(
    inputs: Mapping[str, Tensor], check_empty: bool = True
) -> tuple[SequenceBatch, SequenceBatch]:
    """TRL's collated preference batch (``input_ids``, ``attention_mask``, ``completion_mask``;
    chosen rows first, then rejected) as (chosen, rejected) :class:`SequenceBatch`. A row
    without response tokens is an error unless ``check_empty`` is False."""
    missing = [k for k in ("input_ids", "attention_mask", "completion_mask") if k not in inputs]
    if missing:
        raise ValueError(
            f"not a TRL preference batch: missing {', '.join(missing)} (is this a DPOTrainer "
            "with a text-only dataset?)"
        )
    ids = inputs["input_ids"]
    if ids.shape[0] % 2:
        raise ValueError(f"a preference batch has an even number of rows, got {ids.shape[0]}")
    resp = inputs["completion_mask"].bool()
    empty = (resp.sum(1) == 0).nonzero().flatten().tolist()
    if empty and check_empty:
        raise ValueError(f"rows {empty} of the batch have no response token (truncated?)")
    joint = SequenceBatch(ids, inputs["attention_mask"].long(), resp)
    b = ids.shape[0] // 2
    return joint.select(range(b)), joint.select(range(b, 2 * b))


def _probe_pairs(inputs: Mapping[str, Tensor], k: int) -> list[int]:
    """The first ``k`` pairs of a TRL preference batch whose chosen and rejected responses both
    kept a token (a batch probe's pairs)."""
    resp = inputs["completion_mask"].bool().any(1)
    b = len(resp) // 2
    return (resp[:b] & resp[b:]).nonzero().flatten()[:k].tolist()


def _records(probe: Any) -> list[dict[str, Any]]:
    """Probe pairs as ``{"prompt", "chosen", "rejected"}`` records (dicts, a ``datasets``
    Dataset, a DataFrame, or objects with those attributes such as
    :class:`ge_utils.data.PreferencePair`)."""
    if isinstance(probe, pd.DataFrame):
        rows: Iterable[Any] = probe.to_dict("records")
    elif isinstance(probe, Iterable) and not isinstance(probe, str | bytes | Mapping):
        rows = probe
    else:
        raise TypeError(
            "probe must be pairs (records with prompt/chosen/rejected, a Dataset, a DataFrame or "
            f"a ProbeBatch), an int k (the batch's own first k pairs) or None, got {probe!r}"
        )
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, Mapping):
            rec = {k: row.get(k) for k in ("prompt", "chosen", "rejected")}
        else:
            rec = {k: getattr(row, k, None) for k in ("prompt", "chosen", "rejected")}
        for key, value in rec.items():
            if value is None:
                raise ValueError(f"probe pair {i} has no {key!r} field")
            if isinstance(value, str) and key != "prompt" and not value.strip():
                raise ValueError(f"probe pair {i} has an empty {key} response")
            if isinstance(value, list) and key != "prompt" and not value:
                raise ValueError(f"probe pair {i} has an empty {key} response")
        out.append(rec)
    if not out:
        raise ValueError("the probe set is empty")
    return out


def tokenize_probe(trainer: Any, probe: Any) -> ProbeBatch:
    """Tokenize probe pairs exactly as the trainer tokenizes its training pairs (its own dataset
    preparation and collator: EOS, chat template, truncation). A :class:`ProbeBatch` or a
    ``(chosen, rejected)`` tuple of :class:`SequenceBatch` is checked and returned as is."""
    if isinstance(probe, tuple) and len(probe) == 2:
        probe = ProbeBatch(*probe)
    if isinstance(probe, ProbeBatch):
        if len(probe.chosen) != len(probe.rejected):
            raise ValueError(f"{len(probe.chosen)} chosen but {len(probe.rejected)} rejected")
        if len(probe) == 0:
            raise ValueError("the probe set is empty")
        for side in ("chosen", "rejected"):
            lengths = getattr(probe, side).response_lengths
            if (lengths == 0).any():
                rows = (lengths == 0).nonzero().flatten().tolist()
                raise ValueError(f"probe {side} rows {rows} have an empty response")
        return probe
    from datasets import Dataset

    records = _records(probe)
    prepare = getattr(trainer, "_prepare_dataset", None)
    if prepare is None:
        raise TypeError(f"{type(trainer).__name__} cannot tokenize a probe set (not a DPOTrainer)")
    data = prepare(Dataset.from_list(records), trainer.processing_class, trainer.args, "probe")
    if len(data) != len(records):
        raise ValueError(
            f"{len(records) - len(data)} probe pair(s) were dropped by the trainer's "
            "preparation (prompt longer than max_length?)"
        )
    keep = ("prompt_ids", "chosen_ids", "rejected_ids")
    batch = trainer.data_collator([{k: row[k] for k in keep} for row in data])
    chosen, rejected = split_trl_batch(batch)
    return ProbeBatch(chosen, rejected)


@contextlib.contextmanager
def _rng_untouched() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's (CPU and CUDA) RNG states afterwards."""
    py, npy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def _training_forward_is_random(model: nn.Module) -> bool:
    """Whether two training-mode forwards of one made-up sequence differ: dropout is on
    somewhere, e.g. a model's functional dropout, which TRL's ``disable_dropout`` (it zeroes
    ``nn.Dropout`` modules) does not reach. RNG states and the train/eval mode are restored."""
    ids = torch.tensor([[0, 1, 2, 1]], device=next(model.parameters()).device)
    was_training = model.training
    try:
        with _rng_untouched(), torch.no_grad():
            model.train()
            first, second = (model(input_ids=ids).logits for _ in range(2))
    finally:
        model.train(was_training)
    return not torch.allclose(first, second, rtol=1e-4, atol=1e-5)


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


_HEAD_SCALES = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)
CONSISTENCY_RTOL = 1e-3  # |grad h_t - c_i v_t| <= this x the sequence's largest |grad h_s|


class _StepRecorder:
    """Per-pair statistics of a step's micro-batches from the trainer's own forward and backward.

    A :class:`~ge_utils.stats.recorder.GhostRecorder` on the policy sees every layer of the
    backbone. TRL's fused LM head reads the head weight directly, so the head is added by hand:
    with ``h_t`` the backbone output at a position whose next token ``y`` is a response token
    and ``p_t = softmax(W h_t + b)``, ``d log p(y) / d h_t = v_t = W^T (e_y - p_t)``. The
    gradient the backward brings to ``h_t`` is ``gamma_t v_t`` (the backbone output reaches the
    loss only through these log-probs). For a loss of the summed log-probs, ``gamma_t = c_i =
    dLoss/du_i`` at every response token of sequence i: ``c_i`` is the least-squares fit
    ``sum_t <grad h_t, v_t> / sum_t |v_t|^2`` over the sequence's response tokens, and the fit
    is checked, ``|grad h_t - c_i v_t| <= CONSISTENCY_RTOL max_s |grad h_s|`` at every token
    (otherwise the micro-batch gets a separate pass). The check is on the gradients, not on
    per-token ratios ``<grad h_t, v_t> / |v_t|^2``, which float32 rounding spoils where the
    model is confident (``p_t(y)`` near 1, ``|v_t|`` small). The head's per-sequence gradient
    is ``c_i sum_t (e_y - p_t) h_t^T`` (an outer factor, with the embedding's cross terms when
    the weights are tied); the recorder divides every product by ``c_i c_j``.
    Exact up to float rounding; the statistics are those of the training forward (with its
    dropout, if any; TRL disables dropout by default).
    """

    def __init__(
        self, policy: nn.Module, params: ParamSpec = None, keep_pairs: int | None = None
    ):
        base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        self.head = base.get_output_embeddings()
        self.rec = GhostRecorder(policy, params, keep_outputs=False)
        self.keep_pairs = keep_pairs  # a batch probe: pairs kept from the first micro-batch
        self.keeping: list[int] | None = None  # pairs kept in the current micro-batch
        self.head_params = {
            name: p
            for name in ("weight", "bias")
            if (p := getattr(self.head, name, None)) is not None and id(p) in self.rec.names
        }
        self.micro: _MicroBatch | None = None
        self.hidden: Tensor | None = None
        self.grad: Tensor | None = None
        self.handle = base.base_model.register_forward_hook(self._keep_hidden)
        self.device = next(policy.parameters()).device
        self.seconds = 0.0

    @staticmethod
    def supported(policy: nn.Module) -> bool:
        """Whether the fused head is the plain ``log_softmax(W h + b)`` (no logit scale or
        soft-capping in the config) and the backbone can be hooked."""
        base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        config = base.config.get_text_config()
        plain = all(getattr(config, k, None) is None for k in _HEAD_SCALES)
        return plain and base.base_model is not base and base.get_output_embeddings() is not None

    def _keep_hidden(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.micro is None or not torch.is_grad_enabled():
            return
        h = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        if not h.requires_grad:
            return
        self.hidden = h.detach()
        h.register_hook(self._keep_grad)

    def _keep_grad(self, grad: Tensor) -> None:
        self.grad = grad.detach()

    def start(self, micro: _MicroBatch) -> None:
        """Before the trainer's forward of ``micro``: the previous micro-batch's backward is
        done, so its statistics are read now."""
        self.finish()
        self.micro, self.hidden, self.grad = micro, None, None
        self.rec.clear()
        b = int(micro.inputs["input_ids"].shape[0]) // 2
        self.rec.expect_pairs(b)
        self.keeping = None
        if self.keep_pairs:  # the first micro-batch of the step only
            self.keeping = _probe_pairs(micro.inputs, self.keep_pairs)
            self.keep_pairs = None
            if self.keeping:
                self.rec.keep_rows(self.keeping + [b + i for i in self.keeping])

    def finish(self) -> None:
        micro, self.micro = self.micro, None
        if micro is None or self.grad is None:
            return
        start = device_clock(self.device)
        micro.stats = self._stats(micro)
        self.seconds += device_clock(self.device) - start

    def close(self) -> None:
        self.finish()
        self.rec.close()
        self.handle.remove()

    @torch.no_grad()
    def _stats(self, micro: _MicroBatch) -> PairStats | None:
        """The micro-batch's pair statistics (and, for a batch probe, ``micro.kept``)."""
        ids, mask = micro.inputs["input_ids"], micro.inputs["completion_mask"].bool()
        n = ids.shape[0]
        seq, pos = mask[:, 1:].nonzero(as_tuple=True)  # position t scores token t + 1
        h = self.hidden[seq, pos].float()
        y = ids[seq, pos + 1]
        weight = self.head.weight.detach().float()
        logits = h @ weight.T
        if self.head.bias is not None:
            logits = logits + self.head.bias.detach().float()
        logp = logits.log_softmax(-1)
        p = logp.exp()
        v = weight[y] - p @ weight
        g = self.grad[seq, pos].float()
        zeros = torch.zeros(n, dtype=g.dtype, device=g.device)
        fit = zeros.index_add(0, seq, (g * v).sum(-1))
        coef = fit / zeros.index_add(0, seq, (v * v).sum(-1)).clamp_min(torch.finfo(g.dtype).tiny)
        gamma = coef[seq]
        scale = zeros.scatter_reduce(0, seq, g.norm(dim=-1), "amax", include_self=False)[seq]
        if bool(((g - gamma[:, None] * v).norm(dim=-1) > CONSISTENCY_RTOL * scale).any()):
            return None  # not a loss of the summed log-probs: a separate pass instead
        if self.head_params:
            rows = -p
            rows[torch.arange(len(y), device=y.device), y] += 1.0
            rows = rows * gamma[:, None]  # c_i (e_y - p_t): the head's output gradient
            left = group_rows(rows, seq, n)
            if "weight" in self.head_params:
                right = group_rows(h, seq, n)
                self.rec.add_use(self.head_params["weight"], Factor.outer(left, right))
            if "bias" in self.head_params:
                self.rec.add_use(self.head_params["bias"], Factor.dense(left.sum(1)))
        u = torch.zeros(n, dtype=torch.float64, device=logp.device)
        u.index_add_(0, seq, logp.gather(1, y[:, None])[:, 0].double())
        b = n // 2
        if self.keeping:
            rows = torch.tensor(self.keeping + [b + i for i in self.keeping], device=u.device)
            micro.kept = _KeptPairs(
                self.keeping, u[rows].cpu(), coef[rows].double().cpu(), self.rec.kept()
            )
        stats = self.rec.pair_stats(coef[:b], coef[b:])
        return stats.with_logps(u[:b], u[b:])


class EntanglementCallback(TrainerCallback):
    """Adds ``ge/*`` gradient-entanglement metrics to a TRL ``DPOTrainer``'s logs (see the module
    docstring). Build it with :func:`attach_entanglement_metrics`.

    ``every``: compute at every ``every``-th optimizer step; None (default): at the trainer's
    logging steps (``logging_strategy="steps"``, plus the first step with
    ``logging_first_step``). ``probe``: pairs (records with prompt/chosen/rejected, a Dataset or
    DataFrame, or a :class:`ProbeBatch`) followed across each computed step; an int k: the first
    k pairs (with both responses non-empty) of each probed step's first micro-batch on each
    process, their own change across the step (``pair`` in :meth:`probe_frame`: the process's
    rank times k plus the pair's position among them); None: no probe metrics.
    ``probe_every``: follow the probe at every ``probe_every``-th optimizer step instead (e.g.
    the batch statistics at every step, which cost little, and the probe, which costs a forward
    and a backward of its pairs, every tenth); None: at the steps measured.
    ``loss``: the margin loss whose coefficients classify the cases; None: TRL's
    sigmoid (DPO) loss with ``beta=trainer.beta``. ``max_pairs``: at most this many pairs of each
    micro-batch of each process (None: all). ``in_backward``: record the statistics in the
    trainer's own backward where possible (see the module docstring); False: a separate pass at
    every measured step. ``params``: the parameters whose gradients the batch statistics are
    over (names or a predicate, :func:`ge_utils.stats.params.parameter_set`; trainable ones
    only), e.g. to leave out a module the fast statistics refuse; None: every trainable
    parameter. The probe's prediction ``g . Delta theta`` is always over every trainable
    parameter (the update moves them all). A model the statistics cannot handle is refused
    when the callback is built, from one made-up pair.

    Per-pair results are kept: :meth:`pairs_frame` (one row per batch pair and computed step)
    and :meth:`probe_frame` (one row per probe pair and computed step), identical on every
    process.
    """

    def __init__(
        self,
        trainer: Any,
        probe: Any = None,
        every: int | None = None,
        loss: MarginLoss | None = None,
        max_pairs: int | None = None,
        in_backward: bool = True,
        probe_every: int | None = None,
        params: ParamSpec = None,
    ):
        _check_trainer(trainer, loss)
        for name, value in (("every", every), ("probe_every", probe_every)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if probe_every is not None and probe is None:
            raise ValueError("probe_every needs a probe set (probe=...)")
        batch_probe = isinstance(probe, int) and not isinstance(probe, bool)
        if batch_probe and probe < 1:
            raise ValueError(f"probe=k follows k >= 1 pairs of each batch, got {probe!r}")
        dropout_off = getattr(trainer.args, "disable_dropout", True)
        model = trainer.accelerator.unwrap_model(trainer.model)
        random_forward = _training_forward_is_random(model)
        if dropout_off and random_forward:
            warnings.warn(
                "disable_dropout=True did not turn off all dropout in this model (e.g. a model's "
                "own functional dropout, such as OPT's config.dropout): training runs with "
                "dropout, and the ge/ batch statistics are those of the dropout forward. Set the "
                "config's dropout to 0 to train without it.",
                stacklevel=2,
            )
        if batch_probe and (not dropout_off or random_forward):
            raise ValueError(
                "probe=k (the batch's own pairs) needs a training forward without dropout: "
                "disable_dropout=True (TRL's default), and no dropout that it does not reach "
                "(a model's own functional dropout, e.g. OPT's: set the config's dropout to 0); "
                "their log-probs before the step are read off the training forward"
            )
        if max_pairs is not None and max_pairs < 1:
            raise ValueError(f"max_pairs must be >= 1 or None, got {max_pairs!r}")
        if every is None and str(getattr(trainer.args, "logging_strategy", "steps")) not in (
            "steps",
            "IntervalStrategy.STEPS",
        ):
            raise ValueError(
                "logging_strategy is not 'steps': pass every=N to choose the steps to measure"
            )
        self.trainer = trainer
        self.params = self._measured(params)
        self._check_recordable()
        self.every = every
        self.probe_every = probe_every
        self.loss = loss if loss is not None else get_loss("dpo", beta=float(trainer.beta))
        weights = list(getattr(trainer, "loss_weights", None) or [1.0])
        self.loss_weight = float(weights[0]) if len(weights) == 1 else 1.0
        self.max_pairs = max_pairs
        self.probe: ProbeBatch | None = None
        self.batch_probe: int | None = probe if batch_probe else None
        if probe is not None and not batch_probe:
            self.probe = tokenize_probe(trainer, probe)
        self._captured: list[_MicroBatch] = []
        self._awaiting: _MicroBatch | None = None  # inside the trainer's compute_loss
        aux_loss = bool(getattr(trainer, "aux_loss_enabled", False))
        self.in_backward = in_backward and not aux_loss and _StepRecorder.supported(self._policy())
        self._step: _StepRecorder | None = None
        self._ref_hook = self._hook_reference()
        self._before: _ProbeBefore | None = None
        self._next: _ProbeBefore | None = None  # the next step's, from this step's after-pass
        self._theta_buffer: dict[str, Tensor] = {}  # memory for the parameter copies, kept
        self._seconds = 0.0
        self._pairs: list[pd.DataFrame] = []
        self._probes: list[pd.DataFrame] = []
        self._wrap_compute_loss()

    # -- capture ---------------------------------------------------------------------------

    def _wrap_compute_loss(self) -> None:
        """Keep a reference to each training micro-batch (nothing is computed or copied)."""
        original = self.trainer.compute_loss
        if getattr(original, "_ge_capture", False):
            raise RuntimeError("an EntanglementCallback is already attached to this trainer")

        def compute_loss(model, inputs, *args, **kwargs):
            if not (torch.is_grad_enabled() and model.training):
                return original(model, inputs, *args, **kwargs)
            self._awaiting = _MicroBatch(inputs)
            self._captured.append(self._awaiting)
            if self._step is not None:
                self._step.start(self._awaiting)
            try:
                return original(model, inputs, *args, **kwargs)
            finally:
                self._awaiting = None

        compute_loss._ge_capture = True  # type: ignore[attr-defined]
        compute_loss._ge_original = original  # type: ignore[attr-defined]
        self.trainer.compute_loss = compute_loss

    def _hook_reference(self) -> Any:
        """Keep the reference log-probs that the trainer computes in its own loss (the module it
        calls for them: ``ref_model``, or the PEFT policy with its adapters disabled, without
        gradient), so that a measured step needs no reference forward of its own. Each is
        ``outputs.log_probs[:, -(T - 1):].sum(1)``, the same operation on the same tensor as in
        TRL's ``_compute_loss``. None when the reference is precomputed or there is none."""
        trainer = self.trainer
        if getattr(trainer, "precompute_ref_logps", False):
            return None
        module = trainer.ref_model
        if module is None:
            if not hasattr(self._policy(), "peft_config"):
                return None
            module = trainer.model

        def keep(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            record = self._awaiting
            labels = kwargs.get("labels")
            log_probs = getattr(output, "log_probs", None)
            if record is None or torch.is_grad_enabled() or not kwargs.get("fused_lm_head"):
                return
            if labels is None or log_probs is None:
                return
            record.ref = log_probs[:, -(labels.shape[1] - 1) :].sum(dim=1).detach()

        return module.register_forward_hook(keep, with_kwargs=True)

    def detach(self) -> None:
        """Remove the integration from its trainer."""
        if self._ref_hook is not None:
            self._ref_hook.remove()
            self._ref_hook = None
        original = getattr(self.trainer.compute_loss, "_ge_original", None)
        if original is not None:
            self.trainer.compute_loss = original
        with contextlib.suppress(ValueError):
            self.trainer.remove_callback(self)
        self._theta_buffer, self._before, self._next = {}, None, None

    # -- when ------------------------------------------------------------------------------

    def measures(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based, the value of ``global_step`` after it)
        is measured."""
        if self.every is not None:
            return step % self.every == 0
        args, state = self.trainer.args, self.trainer.state
        every = getattr(state, "logging_steps", None) or args.logging_steps
        every = max(1, int(every if every >= 1 else math.ceil(state.max_steps * every)))
        return step % every == 0 or (step == 1 and bool(args.logging_first_step))

    def probes(self, step: int) -> bool:
        """Whether the probe is followed across optimizer step ``step``."""
        if self.probe is None and self.batch_probe is None:
            return False
        if self.probe_every is not None:
            return step % self.probe_every == 0
        return self.measures(step)

    # -- the model as the trainer sees it --------------------------------------------------

    def _policy(self) -> nn.Module:
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    def _trainable(self) -> dict[str, Tensor]:
        return {n: p for n, p in self._policy().named_parameters() if p.requires_grad}

    def _measured(self, params: ParamSpec) -> list[str] | None:
        """The names of the measured parameters; None for every trainable one."""
        if params is None:
            return None
        chosen = parameter_set(self._policy(), params)
        frozen = [n for n, p in chosen if not p.requires_grad]
        if frozen:
            raise ValueError(f"params must be trainable parameters; frozen: {', '.join(frozen)}")
        names = [n for n, _ in chosen]
        return None if sorted(names) == sorted(self._trainable()) else names

    def _check_recordable(self) -> None:
        """The fast statistics of one made-up pair, before training: a model with a layer they
        cannot handle (or logits they cannot reproduce) is refused now, with the way out, rather
        than in the middle of the first measured step."""
        policy = self._policy()
        ids = torch.tensor([[0, 1, 2], [0, 2, 1]], device=next(policy.parameters()).device)
        response = torch.tensor([[False, True, True]] * 2, device=ids.device)
        batch = SequenceBatch(ids, torch.ones_like(ids), response)
        try:
            with _rng_untouched():
                fast_gradient_stats(policy, batch.select([0]), batch.select([1]), self.params)
        except TypeError as exc:
            raise TypeError(
                f"the entanglement metrics cannot be computed on this model: {exc} (here: "
                "attach_entanglement_metrics(..., params=...))"
            ) from exc

    def _copy_trainable(self) -> dict[str, Tensor]:
        """A copy of the trainable parameters, written into the same memory at every probed
        step (allocated at the first, or again when a parameter's name, shape, dtype or device
        changed): a fresh copy of SmolLM2-135M took 0.13 s on the 2-core CPU, mostly page
        faults, against 0.04 s into kept memory. The previous copy is used up by then
        (:class:`_Update` turned it into that step's update and it was read)."""
        now = {n: p.detach() for n, p in self._trainable().items()}
        held = self._theta_buffer

        def fits(name: str, p: Tensor) -> bool:
            b = held.get(name)
            return b is not None and (b.shape, b.dtype, b.device) == (p.shape, p.dtype, p.device)

        if held.keys() != now.keys() or not all(fits(n, p) for n, p in now.items()):
            self._theta_buffer = {n: p.clone() for n, p in now.items()}
        else:
            for n, p in now.items():
                held[n].copy_(p)
        return dict(self._theta_buffer)

    def _reference(self, micro: _MicroBatch, keep: list[int], c: SequenceBatch, r: SequenceBatch):
        """Reference log-probs (B,) of the kept pairs: the batch's precomputed columns, those the
        trainer computed in its own loss, or (neither available) a reference forward here."""
        inputs = micro.inputs
        if "ref_chosen_logps" in inputs and "ref_rejected_logps" in inputs:
            return inputs["ref_chosen_logps"][keep], inputs["ref_rejected_logps"][keep]
        if micro.ref is not None:
            ref_w, ref_l = micro.ref.chunk(2)
            return ref_w[keep], ref_l[keep]
        trainer = self.trainer
        with torch.no_grad():
            joint = concat_batches(c, r)
            if trainer.ref_model is not None:
                ref = trainer.accelerator.unwrap_model(trainer.ref_model)
                return _eval_logps(ref, joint).chunk(2)
            policy = self._policy()
            if hasattr(policy, "peft_config"):
                from trl.trainer.utils import use_adapter

                name = "ref" if "ref" in policy.peft_config else None
                with use_adapter(policy, adapter_name=name):
                    return _eval_logps(policy, joint).chunk(2)
        raise RuntimeError(
            "no reference log-probs: the trainer has no ref_model, the model is not a PEFT "
            "model and the batch has no precomputed ref_chosen_logps/ref_rejected_logps"
        )

    # -- events ----------------------------------------------------------------------------

    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step + 1
        # the probe's prediction needs every trainable parameter's factors: where only some are
        # measured, it takes a separate pass (or, where that fails, forward mode) instead
        keep = self.batch_probe if self.probes(step) and self.params is None else None
        if self.in_backward and (self.measures(step) or keep):
            self._step = _StepRecorder(self._policy(), self.params, keep_pairs=keep)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        captured, self._captured = self._captured, []
        step = state.global_step + 1
        recorded = 0.0
        device = next(self._policy().parameters()).device
        if self._step is not None:
            earlier, start = self._step.seconds, device_clock(device)
            self._step.close()  # reads the last micro-batch's statistics, timed here once
            recorded = earlier + device_clock(device) - start
            self._step = None
        if not (self.measures(step) or self.probes(step)):
            return
        start = device_clock(device) - recorded
        with _rng_untouched():
            if self.measures(step):
                records = []
                for micro in captured:
                    records += self._batch_records(micro, step)
                rows = _gather(records)
                if rows:
                    self._log_batch(pd.DataFrame(rows))
            if self.probes(step) and self.batch_probe is not None:
                self._before = self._batch_probe_before(captured[0])
            elif self.probes(step):
                chained, self._next = self._next, None
                self._before = chained if chained is not None else self._probe_before()
        self._seconds = device_clock(device) - start

    def on_optimizer_step(self, args, state, control, **kwargs):
        before, self._before = self._before, None
        step = state.global_step + 1
        if not (self.measures(step) or self.probes(step)):
            return
        device = next(self._policy().parameters()).device
        start = device_clock(device)
        if before is not None:
            chain = self.probe is not None and self.probes(step + 1) and step < state.max_steps
            with _rng_untouched():
                self._probe_step(before, step, chain)
        self._seconds += device_clock(device) - start
        self.trainer._metrics["train"][PREFIX + "seconds"].append(self._seconds)

    # -- batch statistics ------------------------------------------------------------------

    def _batch_records(self, micro: _MicroBatch, step: int) -> list[dict]:
        chosen, rejected = split_trl_batch(micro.inputs, check_empty=False)
        # pairs whose responses were truncated away carry no gradient: left out
        nonempty = (chosen.response_lengths > 0) & (rejected.response_lengths > 0)
        keep = nonempty.nonzero().flatten()[: self.max_pairs].tolist()
        if not keep:
            return []
        if len(keep) < len(chosen):
            chosen, rejected = chosen.select(keep), rejected.select(keep)
        if micro.stats is not None:
            stats = micro.stats.select(keep)
        else:
            stats = fast_gradient_stats(self._policy(), chosen, rejected, self.params)
        ref_w, ref_l = self._reference(micro, keep, chosen, rejected)
        p = PairLogps(
            stats["logp_chosen"],
            stats["logp_rejected"],
            ref_w.detach().double().cpu().flatten()[: len(chosen)],
            ref_l.detach().double().cpu().flatten()[: len(chosen)],
            chosen.response_lengths.double().cpu(),
            rejected.response_lengths.double().cpu(),
        )
        d_w, d_l = self.loss.coefficients(p)
        table = condition_table(stats, self.loss_weight * d_w, self.loss_weight * d_l)
        table.insert(0, "step", step)
        table.insert(1, "rank", int(self.trainer.accelerator.process_index))
        return table.to_dict("records")

    def _log_batch(self, pairs: pd.DataFrame) -> None:
        pairs = pairs.reset_index(drop=True)
        pairs.insert(2, "pair", range(len(pairs)))
        self._pairs.append(pairs)
        metrics = self.trainer._metrics["train"]
        cols = {
            "inner": "grad_inner",
            "cosine": "cosine",
            "norm2_chosen": "grad_norm2_chosen",
            "norm2_rejected": "grad_norm2_rejected",
            "d_w": "d_w",
            "d_l": "d_l",
        }
        for key, col in cols.items():
            metrics[PREFIX + key].append(_mean(pairs[col].tolist()))
        ratio = pairs["inner_over_min_norm2"].to_numpy()
        ratio = ratio[np.isfinite(ratio)]
        median = float(np.median(ratio)) if len(ratio) else float("nan")
        metrics[PREFIX + "inner_over_min_norm2"].append(median)
        for k in (1, 2, 3, 4):
            metrics[PREFIX + f"case{k}_frac"].append(float((pairs["case"] == k).mean()))
        metrics[PREFIX + "n_pairs"].append(float(len(pairs)))

    # -- probe -----------------------------------------------------------------------------

    def _probe_before(self) -> _ProbeBefore:
        """Just before the optimizer step: a copy of the trainable parameters and, where the
        recorder handles the model, this process's probe log-probs with the per-layer factors
        of their gradients (:func:`_logps_and_factors`)."""
        theta0 = self._copy_trainable()
        accel = self.trainer.accelerator
        rank, world = int(accel.process_index), int(accel.num_processes)
        mine = list(range(rank, len(self.probe), world))
        if not mine:
            return _ProbeBefore(theta0, mine)
        policy = self._policy()
        device = next(policy.parameters()).device
        part = self.probe.select(mine)
        joint = concat_batches(part.chosen, part.rejected).to(device)
        found = _logps_and_factors(policy, joint)
        if found is None:
            return _ProbeBefore(theta0, mine, joint)
        return _ProbeBefore(theta0, mine, joint, *found)

    def _batch_probe_before(self, micro: _MicroBatch) -> _ProbeBefore:
        """Just before the optimizer step, for ``probe=k``: a copy of the trainable parameters
        and the first k pairs of the step's first micro-batch, with their log-probs and kept
        factors from the trainer's own forward and backward (``micro.kept``), or, where those
        were not recorded, from a separate pass (:func:`_logps_and_factors`)."""
        theta0 = self._copy_trainable()
        kept = micro.kept
        pairs = kept.pairs if kept is not None else _probe_pairs(micro.inputs, self.batch_probe)
        rank = int(self.trainer.accelerator.process_index)
        mine = [rank * self.batch_probe + j for j in range(len(pairs))]
        if not pairs:
            return _ProbeBefore(theta0, mine)
        chosen, rejected = split_trl_batch(micro.inputs, check_empty=False)
        joint = concat_batches(chosen.select(pairs), rejected.select(pairs)).trimmed()
        if kept is not None:
            return _ProbeBefore(theta0, mine, joint, kept.logps, kept.factors, kept.coef)
        found = _logps_and_factors(self._policy(), joint)
        return _ProbeBefore(theta0, mine, joint, *(found or ()))

    def _probe_step(self, probe: _ProbeBefore, step: int, chain: bool = False) -> None:
        """After the optimizer step: the probe's predicted and realized changes. With ``chain``
        (the next step is measured too) the realized change comes from the next step's
        before-pass, run now: the parameters do not change between this optimizer step and the
        next, so one forward and backward of the probe serves both steps."""
        mine, joint = probe.mine, probe.joint
        records = []
        if mine:
            policy = self._policy()
            now = {n: p.detach() for n, p in self._trainable().items()}
            if probe.recorder is not None:
                before = probe.logps
                pred = probe.recorder.directional(_Update(now, probe.theta0))
                if probe.scale is not None:  # factors of a training backward: c_i grad u_i
                    c = probe.scale
                    pred = pred / torch.where(c.abs() < TINY_COEFFICIENT, torch.nan, c)
            else:
                delta = {n: now[n] - probe.theta0[n] for n in probe.theta0}
                before, pred = directional_logps(policy, joint, probe.theta0, delta)
        probe.theta0, probe.recorder = {}, None  # used up: its memory takes the next copy
        if chain:
            self._next = self._probe_before()
        if mine:
            if self._next is not None and self._next.logps is not None:
                after = self._next.logps
            else:
                after = _eval_logps(policy, joint)
            n = len(mine)
            for k, i in enumerate(mine):
                rec = {"step": step, "pair": i}
                for side, j in (("chosen", k), ("rejected", n + k)):
                    rec[f"logp_{side}"] = float(before[j])
                    rec[f"pred_delta_{side}"] = float(pred[j])
                    rec[f"real_delta_{side}"] = float(after[j] - before[j])
                records.append(rec)
        rows = sorted(_gather(records), key=lambda r: r["pair"])
        frame = pd.DataFrame(rows)
        frame["real_case"] = classify_cases(
            torch.tensor(frame["real_delta_chosen"].values),
            torch.tensor(frame["real_delta_rejected"].values),
        ).numpy()
        frame["pred_case"] = classify_cases(
            torch.tensor(frame["pred_delta_chosen"].values),
            torch.tensor(frame["pred_delta_rejected"].values),
        ).numpy()
        self._probes.append(frame)
        metrics = self.trainer._metrics["train"]
        for side in ("chosen", "rejected"):
            for kind in ("pred", "real"):
                key = f"{kind}_delta_{side}"
                metrics[PREFIX + "probe_" + key].append(_mean(frame[key].tolist()))
        agree = np.concatenate(
            [
                np.sign(frame[f"pred_delta_{s}"]) == np.sign(frame[f"real_delta_{s}"])
                for s in ("chosen", "rejected")
            ]
        )
        metrics[PREFIX + "probe_sign_agree"].append(float(agree.mean()))
        for k in (1, 2, 3, 4):
            frac = float((frame["real_case"] == k).mean())
            metrics[PREFIX + f"probe_real_case{k}_frac"].append(frac)

    # -- results ---------------------------------------------------------------------------

    def pairs_frame(self) -> pd.DataFrame:
        """One row per batch pair and measured step: ``step, rank, pair`` and the columns of
        :func:`ge_utils.gradients.condition_table` (``grad_inner``, ``cosine``, ``d_w``,
        ``case``, ...)."""
        return pd.concat(self._pairs, ignore_index=True) if self._pairs else pd.DataFrame()

    def probe_frame(self) -> pd.DataFrame:
        """One row per probe pair and measured step: ``step, pair, logp_*`` (before the step),
        ``pred_delta_*`` (``g . Delta theta``), ``real_delta_*``, ``pred_case``, ``real_case``."""
        return pd.concat(self._probes, ignore_index=True) if self._probes else pd.DataFrame()


@dataclass
class _ProbeBefore:
    """A measured step's probe state before its optimizer step: ``theta0`` (a copy of the
    trainable parameters), this process's probe pairs ``mine`` and their batch ``joint``
    (chosen rows first), and, from :func:`_logps_and_factors`, their log-probs and the recorder
    holding the factors of their gradients (None where the recorder cannot handle the model:
    then :func:`directional_logps` after the step)."""

    theta0: dict[str, Tensor]
    mine: list[int]
    joint: SequenceBatch | None = None
    logps: Tensor | None = None
    recorder: GhostRecorder | KeptFactors | None = None
    scale: Tensor | None = None  # the coefficients c_i of the backward the factors come from


class _Update(Mapping[str, Tensor]):
    """The step's update ``Delta theta = theta_now - theta0`` by parameter name, computed on
    access into the storage of ``theta0[name]`` (no new memory; that copy is used up, so each
    name is read once)."""

    def __init__(self, now: Mapping[str, Tensor], theta0: Mapping[str, Tensor]):
        self.now, self.theta0 = now, theta0

    def __getitem__(self, name: str) -> Tensor:
        before = self.theta0[name]
        return torch.sub(self.now[name], before, out=before)

    def __iter__(self) -> Iterator[str]:
        return iter(self.theta0)

    def __len__(self) -> int:
        return len(self.theta0)


def _logps_and_factors(
    model: nn.Module, batch: SequenceBatch
) -> tuple[Tensor, GhostRecorder] | None:
    """Summed response log-probs ``u`` (B,) of ``batch`` at the model's current parameters,
    and a :class:`~ge_utils.stats.GhostRecorder` (hooks removed) keeping every trainable
    parameter's per-sequence gradient factors of ``grad u_i`` (layer inputs and output
    gradients): one forward and one backward of ``sum_i u_i`` to the layer outputs, eval mode,
    ``.grad`` untouched. Any later direction ``v`` then gives the exact ``grad u_i . v`` from
    the factors (:meth:`~ge_utils.stats.GhostRecorder.directional`: for a linear layer ``sum_t
    g_t^T V a_t``), at the cost of one multiplication of each layer's rows, instead of a
    forward-mode pass. None where the recorder cannot handle the model (a layer it has no rule
    for, a parameter used outside its module)."""
    try:
        rec = GhostRecorder(model, batch=batch, keep_factors=True)
    except TypeError:
        return None
    try:
        with eval_mode(model), torch.enable_grad():
            u = sequence_logprobs(model, batch)
            rec.backward(u.sum())
    except (TypeError, RuntimeError):
        return None
    finally:
        rec.close()
    return u.detach(), rec


def _eval_logps(model: nn.Module, batch: SequenceBatch) -> Tensor:
    with eval_mode(model):
        with torch.no_grad():
            device = next(model.parameters()).device
            return sequence_logprobs(model, batch.to(device)).detach()


def _gather(records: list[dict]) -> list[dict]:
    """Every process's records, in process order (no-op on one process)."""
    from accelerate.utils import gather_object

    return list(gather_object(records))


def _check_trainer(trainer: Any, loss: MarginLoss | None) -> None:
    """Raise a clear error for a trainer or setting the integration cannot measure."""
    try:
        from trl import DPOTrainer
    except ImportError as exc:  # pragma: no cover - trl is an extra
        raise ImportError("the TRL integration needs trl: pip install 'ge-utils[trl]'") from exc
    if not isinstance(trainer, DPOTrainer):
        raise TypeError(
            f"unsupported trainer {type(trainer).__name__}: the integration works with TRL's "
            "DPOTrainer (and subclasses)"
        )
    if not isinstance(getattr(trainer, "_metrics", None), dict) or "train" not in trainer._metrics:
        raise TypeError("unsupported DPOTrainer version: it has no _metrics dict (TRL >= 1.0)")
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(
        trainer, "is_fsdp_enabled", False
    ):
        raise NotImplementedError("DeepSpeed and FSDP (sharded parameters) are not supported")
    if getattr(trainer, "use_weighting", False):
        raise NotImplementedError(
            "use_weighting=True (WPO) multiplies each pair's loss by a weight of its own, which "
            "no MarginLoss has: the coefficients d_w, d_l would be wrong"
        )
    if loss is not None:
        if not isinstance(loss, MarginLoss):
            raise TypeError(f"loss must be a ge_utils.losses.MarginLoss, got {type(loss).__name__}")
        return
    if list(getattr(trainer, "loss_types", ["sigmoid"])) != ["sigmoid"]:
        raise NotImplementedError(
            f"loss_type {trainer.loss_types} is not TRL's plain DPO ('sigmoid'): pass loss= "
            "(a ge_utils.losses.MarginLoss) with that loss's coefficients"
        )
    if getattr(trainer, "f_divergence_type", "reverse_kl") != "reverse_kl":
        raise NotImplementedError(
            f"f_divergence_type={trainer.f_divergence_type!r} changes the loss coefficients: "
            "only reverse_kl (standard DPO) is supported"
        )
    if getattr(trainer, "ld_alpha", None) is not None:
        raise NotImplementedError("ld_alpha (LD-DPO) changes the log-probs: not supported")


def attach_entanglement_metrics(
    trainer: Any,
    probe: Any = None,
    every: int | None = None,
    loss: MarginLoss | None = None,
    max_pairs: int | None = None,
    in_backward: bool = True,
    probe_every: int | None = None,
    params: ParamSpec = None,
) -> EntanglementCallback:
    """Build an :class:`EntanglementCallback` for ``trainer``, add it to the trainer's
    callbacks, and return it. Call before ``trainer.train()``, on every process."""
    callback = EntanglementCallback(
        trainer,
        probe,
        every=every,
        loss=loss,
        max_pairs=max_pairs,
        in_backward=in_backward,
        probe_every=probe_every,
        params=params,
    )
    trainer.add_callback(callback)
    return callback
