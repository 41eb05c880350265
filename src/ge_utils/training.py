"""Training: supervised fine-tuning, then preference optimization with any margin loss.

The loop records what the paper plots. Every ``eval_every`` steps (and at step 0) it logs, on a
fixed held-out set, each pair's summed log-probs ``u_w, u_l``, rewards ``r = u - u_ref``, margin
and the loss coefficients ``d_w, d_l``; and on a fixed probe set each pair's gradient statistics
``|g_w|^2, |g_l|^2, <g_w, g_l>``, cosine and first-order case. Reference log-probs are those of
the model at the start of preference optimization, computed once (no second model is kept).
With ``train_stats`` the same per-pair gradient statistics are recovered for every training pair
of every step from the training backward itself (:class:`ge_utils.stats.GhostRecorder`),
logged under split ``train`` at the step whose parameters they were computed on.

Results come back as a :class:`RunResult` with two tidy DataFrames: ``steps`` (one row per
optimizer step) and ``pairs`` (one row per logged step, split and pair).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ge_utils.gradients import StatsMethod, condition_table, stats_method
from ge_utils.io import atomic_write_json, atomic_write_text
from ge_utils.logprobs import (
    SequenceBatch,
    build_batch,
    concat_batches,
    eval_mode,
    pad_id,
    prompt_ids,
    response_ids,
    sequence_logprobs,
    token_logprobs,
)
from ge_utils.mitigations import get_objective, response_token_values, scatter_response_tokens
from ge_utils.models import device_clock
from ge_utils.objective import MicrostepResult, Objective, PairLoss, pair_logps

Optimizer = Literal["adamw", "sgd"]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; ``history`` holds the run up to that step."""

    def __init__(self, step: int, value: float, history: RunResult):
        super().__init__(f"loss is {value} at step {step}: training stopped (history kept)")
        self.step = step
        self.history = history


def _is_number(value: Any) -> bool:
    """A real number (int or float), not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class TrainConfig:
    """Hyperparameters of one training phase (SFT or preference optimization).

    Checked on construction (ValueError naming the field): positive integer ``steps``,
    ``batch_size``, ``grad_accum``, ``eval_every``; an integer ``warmup_steps`` >= 0 and ``seed``;
    finite ``lr`` > 0 and ``weight_decay`` >= 0; ``max_grad_norm`` None (no clipping) or finite
    > 0; a known ``optimizer``, ``template``, ``stats_method`` and loss."""

    steps: int = 20
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-6
    optimizer: Optimizer = "adamw"
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float | None = None
    seed: int = 0
    template: Literal["none", "chat"] = "none"
    loss: str = "dpo"
    loss_params: dict[str, float] = field(default_factory=dict)
    eval_every: int = 5
    stats_method: Literal["fast", "exact", "none"] = "fast"
    train_stats: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (_is_number(self.lr) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        wd = self.weight_decay
        if not (_is_number(wd) and math.isfinite(wd) and wd >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {wd!r}")
        if self.max_grad_norm is not None and not (
            _is_number(self.max_grad_norm)
            and math.isfinite(self.max_grad_norm)
            and self.max_grad_norm > 0
        ):
            raise ValueError(
                "max_grad_norm must be None (no clipping) or a finite number > 0, "
                f"got {self.max_grad_norm!r}"
            )
        warmup = self.warmup_steps
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup!r}")
        if not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.template not in ("none", "chat"):
            raise ValueError(f"template must be 'none' or 'chat', got {self.template!r}")
        if self.stats_method not in ("fast", "exact", "none"):
            raise ValueError(f"stats_method must be fast, exact or none: {self.stats_method!r}")
        objective = get_objective(self.loss, **self.loss_params)  # validates name and values
        if self.train_stats and not objective.reports_pair_stats:
            raise ValueError(f"train_stats is not available with {self.loss!r}")


@dataclass
class RunResult:
    """``steps``: one row per optimizer step; ``pairs``: one row per (step, split, pair);
    ``extra``: frames of the objective's own (``mask``: a learned mask's token weights)."""

    steps: pd.DataFrame
    pairs: pd.DataFrame
    extra: dict[str, pd.DataFrame] = field(default_factory=dict)

    def means(self, split: str = "eval") -> pd.DataFrame:
        """Per-step means of every numeric pair column of ``split``."""
        sub = self.pairs[self.pairs["split"] == split].drop(columns=["split", "pair"])
        return sub.groupby("step").mean(numeric_only=True).reset_index()

    def frames(self) -> dict[str, pd.DataFrame]:
        return {"steps": self.steps, "pairs": self.pairs, **self.extra}


@dataclass
class EncodedPairs:
    """Token ids of preference pairs: ``prompts[i]``, ``chosen[i]``, ``rejected[i]``."""

    prompts: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompts)


def _fields(item: Any, names: Sequence[str]) -> list[str]:
    if isinstance(item, dict):
        return [item[n] for n in names]
    return [getattr(item, n) for n in names]


def encode_pairs(tokenizer, pairs: Iterable[Any], template: str = "none") -> EncodedPairs:
    """Tokenize items with ``prompt``, ``chosen``, ``rejected`` (attributes or keys), each a
    ``str`` (TypeError naming the pair and field otherwise)."""
    enc = EncodedPairs([], [], [])
    for i, item in enumerate(pairs):
        try:
            prompt, chosen, rejected = _fields(item, ("prompt", "chosen", "rejected"))
        except (KeyError, AttributeError) as exc:
            raise ValueError(f"pair {i}: needs prompt, chosen and rejected ({exc})") from exc
        for name, text in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            if not isinstance(text, str):
                raise TypeError(
                    f"pair {i}: {name} must be a str, got {type(text).__name__} {text!r:.60}"
                )
        enc.prompts.append(prompt_ids(tokenizer, prompt, template))
        enc.chosen.append(response_ids(tokenizer, chosen))
        enc.rejected.append(response_ids(tokenizer, rejected))
        if not enc.chosen[-1] or not enc.rejected[-1]:
            raise ValueError(f"pair {i}: empty chosen or rejected response")
    if len(enc) == 0:
        raise ValueError("no preference pairs given")
    return enc


def pair_batches(
    enc: EncodedPairs, index: Sequence[int], pad_id: int, device: torch.device | str
) -> tuple[SequenceBatch, SequenceBatch]:
    """Chosen and rejected batches for the pairs in ``index`` (row i of each is pair i)."""
    chosen = build_batch([(enc.prompts[i], enc.chosen[i]) for i in index], pad_id)
    rejected = build_batch([(enc.prompts[i], enc.rejected[i]) for i in index], pad_id)
    return chosen.to(device), rejected.to(device)


def _joint_logprobs(
    model: nn.Module, chosen: SequenceBatch, rejected: SequenceBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of chosen and rejected from one forward over both batches."""
    u = sequence_logprobs(model, concat_batches(chosen, rejected))
    return u[: len(chosen)], u[len(chosen) :]


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _lr_factor(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def _batch_schedule(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Index lists for ``steps`` batches: seeded shuffles, epoch after epoch."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    out = []
    for _ in range(steps):
        batch = []
        while len(batch) < min(batch_size, n):
            if not order:
                order = torch.randperm(n, generator=gen).tolist()
            batch.append(order.pop())
        out.append(batch)
    return out


def sft(
    model: nn.Module,
    tokenizer,
    examples: Sequence[tuple[str, str]],
    cfg: TrainConfig,
) -> pd.DataFrame:
    """Supervised fine-tuning on ``(prompt, response)`` pairs; returns per-step loss history.

    The loss is the mean over sequences of the token-averaged negative log-likelihood of the
    response (nats per token). Raises TypeError, before any training, unless ``examples`` is a
    sequence of ``(prompt, response)`` pairs of strings.
    """
    if isinstance(examples, str | bytes):
        raise TypeError(
            f"examples must be a sequence of (prompt, response) pairs, got a str {examples!r:.60}"
        )
    for i, ex in enumerate(examples):
        if isinstance(ex, str | bytes) or not (
            isinstance(ex, Sequence) and len(ex) == 2 and all(isinstance(t, str) for t in ex)
        ):
            raise TypeError(
                f"examples[{i}] must be a (prompt, response) pair of strings, got "
                f"{type(ex).__name__} {ex!r:.60}"
            )
    if len(examples) == 0:
        raise ValueError("no SFT examples given")
    torch.manual_seed(cfg.seed)
    device = _device_of(model)
    seqs = [
        (prompt_ids(tokenizer, p, cfg.template), response_ids(tokenizer, r)) for p, r in examples
    ]
    opt = _make_optimizer(model, cfg)
    pad = pad_id(tokenizer)
    rows = []
    schedule = _batch_schedule(len(seqs), cfg.batch_size * cfg.grad_accum, cfg.steps, cfg.seed)
    bar = tqdm(schedule, desc="SFT", disable=not cfg.progress)
    model.train()
    for step, index in enumerate(bar):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg.warmup_steps)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for k in range(0, len(index), cfg.batch_size):
            part = index[k : k + cfg.batch_size]
            batch = build_batch([seqs[i] for i in part], pad).to(device)
            nll = -sequence_logprobs(model, batch, average=True).mean() * len(part) / len(index)
            if not torch.isfinite(nll):
                model.eval()
                raise TrainingDivergedError(
                    step, float(nll), RunResult(pd.DataFrame(rows), pd.DataFrame())
                )
            nll.backward()
            total += float(nll.detach())
        if cfg.max_grad_norm:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        rows.append({"step": step + 1, "sft_loss": total})
        bar.set_postfix(loss=f"{total:.3f}")
    model.eval()
    return pd.DataFrame(rows)


@torch.no_grad()
def _eval_logprobs(
    model: nn.Module, enc: EncodedPairs, pad: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    device = _device_of(model)
    u_w, u_l = [], []
    with eval_mode(model):
        for k in range(0, len(enc), batch_size):
            c, r = pair_batches(enc, range(k, min(k + batch_size, len(enc))), pad, device)
            a, b = _joint_logprobs(model, c, r)
            u_w.append(a.double().cpu())
            u_l.append(b.double().cpu())
    return torch.cat(u_w), torch.cat(u_l)


@torch.no_grad()
def _eval_token_logprobs(
    model: nn.Module, enc: EncodedPairs, pad: int, batch_size: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per pair, the response-token log-probs of chosen and of rejected (1-D, in order)."""
    device = _device_of(model)
    out_w: list[torch.Tensor] = []
    out_l: list[torch.Tensor] = []
    with eval_mode(model):
        for k in range(0, len(enc), batch_size):
            c, r = pair_batches(enc, range(k, min(k + batch_size, len(enc))), pad, device)
            out_w += [v.cpu() for v in response_token_values(c, token_logprobs(model, c))]
            out_l += [v.cpu() for v in response_token_values(r, token_logprobs(model, r))]
    return out_w, out_l


def _lengths(seqs: list[list[int]]) -> torch.Tensor:
    return torch.tensor([len(s) for s in seqs], dtype=torch.float64)


def _log_eval(
    step: int, split: str, enc: EncodedPairs, u: tuple, ref: tuple, loss_fn: PairLoss
) -> pd.DataFrame:
    p = pair_logps(u[0], u[1], _lengths(enc.chosen), _lengths(enc.rejected), ref)
    d_w, d_l = loss_fn.coefficients(p)
    return pd.DataFrame(
        {
            "step": step,
            "split": split,
            "pair": range(len(enc)),
            "logp_chosen": p.chosen.numpy(),
            "logp_rejected": p.rejected.numpy(),
            "reward_chosen": (p.chosen - p.ref_chosen).numpy(),
            "reward_rejected": (p.rejected - p.ref_rejected).numpy(),
            "margin": (p.chosen - p.rejected).numpy(),
            "len_chosen": p.len_chosen.numpy(),
            "len_rejected": p.len_rejected.numpy(),
            "loss": loss_fn.loss(p).detach().numpy(),
            "d_w": d_w.detach().numpy(),
            "d_l": d_l.detach().numpy(),
        }
    )


def _log_probe(
    step: int,
    model: nn.Module,
    enc: EncodedPairs,
    ref: tuple,
    loss_fn: PairLoss,
    stats_fn: StatsMethod,
    lr: float,
    pad: int,
) -> pd.DataFrame:
    c, r = pair_batches(enc, range(len(enc)), pad, _device_of(model))
    with eval_mode(model):
        stats = {k: v.detach().double().cpu() for k, v in stats_fn(model, c, r).items()}
    u_w, u_l = stats["logp_chosen"], stats["logp_rejected"]
    p = pair_logps(u_w, u_l, _lengths(enc.chosen), _lengths(enc.rejected), ref)
    d_w, d_l = loss_fn.coefficients(p)
    table = condition_table(stats, d_w.detach(), d_l.detach(), eta=lr)
    table.insert(0, "pair", range(len(enc)))
    table.insert(0, "split", "probe")
    table.insert(0, "step", step)
    return table


def preference_microstep(
    model: nn.Module,
    objective: Objective,
    chosen: SequenceBatch,
    rejected: SequenceBatch,
    ref: tuple[torch.Tensor, torch.Tensor],
    n_total: int,
    record_stats: bool = False,
    ref_tokens: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> MicrostepResult:
    """Forward and backward of one micro-batch of ``objective`` (a margin loss or a mitigation):
    ``loss.sum() / n_total`` is back-propagated (gradients accumulate in ``.grad``). Returns the
    loss, ``u_w``, ``u_l`` and, with ``record_stats``, every pair's gradient statistics (with
    ``d_w``, ``d_l``) recovered from this backward. ``ref_tokens``: (B, T) per-token reference
    log-probs of chosen and rejected, for objectives that need them. Raises
    ``FloatingPointError(value)`` on a NaN or infinite loss, before backward. The contract is
    :meth:`ge_utils.objective.Objective.microstep`'s."""
    return objective.microstep(model, chosen, rejected, ref, n_total, record_stats, ref_tokens)


@dataclass
class _Pairs:
    """A run's encoded pairs and their reference log-probs, computed once at the start."""

    train: EncodedPairs
    held: EncodedPairs
    probe: EncodedPairs | None
    ref_train: tuple[torch.Tensor, torch.Tensor]
    ref_held: tuple[torch.Tensor, torch.Tensor]
    ref_probe: tuple[torch.Tensor, torch.Tensor] | None
    ref_tokens: tuple[list[torch.Tensor], list[torch.Tensor]] | None
    pad: int
    eval_batch: int

    def references(
        self, part: list[int], chosen: SequenceBatch, rejected: SequenceBatch
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
        """Summed (and, when kept, per-token) references of the training pairs ``part``."""
        sel = torch.as_tensor(part)
        ref = (self.ref_train[0][sel], self.ref_train[1][sel])
        if self.ref_tokens is None:
            return ref, None
        return ref, (
            scatter_response_tokens(chosen, [self.ref_tokens[0][i] for i in part]),
            scatter_response_tokens(rejected, [self.ref_tokens[1][i] for i in part]),
        )


def _encode_with_references(
    model: nn.Module, tokenizer, objective: Objective, cfg: TrainConfig, train, held, probe
) -> _Pairs:
    pad, batch = pad_id(tokenizer), max(cfg.batch_size, 16)
    tr = encode_pairs(tokenizer, train, cfg.template)
    he = encode_pairs(tokenizer, held, cfg.template)
    pr = encode_pairs(tokenizer, probe, cfg.template) if probe is not None else None
    ref_tr, ref_he = _eval_logprobs(model, tr, pad, batch), _eval_logprobs(model, he, pad, batch)
    ref_pr = _eval_logprobs(model, pr, pad, batch) if pr else None
    tokens = (
        _eval_token_logprobs(model, tr, pad, batch) if objective.needs_token_reference else None
    )
    return _Pairs(tr, he, pr, ref_tr, ref_he, ref_pr, tokens, pad, batch)


@dataclass
class _History:
    """What a run has logged so far: step rows, pair frames, the objective's own frames."""

    steps: list[dict] = field(default_factory=list)
    pairs: list[pd.DataFrame] = field(default_factory=list)
    extra: dict[str, list[pd.DataFrame]] = field(default_factory=dict)

    def result(self) -> RunResult:
        pairs = pd.concat(self.pairs, ignore_index=True) if self.pairs else pd.DataFrame()
        extra = {k: pd.concat(v, ignore_index=True) for k, v in self.extra.items()}
        return RunResult(pd.DataFrame(self.steps), pairs, extra)


@dataclass
class _PreferenceRun:
    """One preference-optimization run: its model, objective, data, optimizer and history."""

    model: nn.Module
    tokenizer: Any
    objective: Objective
    cfg: TrainConfig
    data: _Pairs
    stats_fn: StatsMethod | None
    on_log: Callable[[int, nn.Module], None] | None
    history: _History = field(default_factory=_History)

    def log(self, step: int) -> None:
        """Held-out (and probe) statistics, the objective's frames and the caller's ``on_log``."""
        d, loss_fn, model = self.data, self.objective.logged, self.model
        u = _eval_logprobs(model, d.held, d.pad, d.eval_batch)
        self.history.pairs.append(_log_eval(step, "eval", d.held, u, d.ref_held, loss_fn))
        if self.stats_fn is not None and d.probe is not None and d.ref_probe is not None:
            probe = _log_probe(
                step, model, d.probe, d.ref_probe, loss_fn, self.stats_fn, self.cfg.lr, d.pad
            )
            self.history.pairs.append(probe)
        for name, frame in self.objective.log_frames(step, self.tokenizer.decode).items():
            self.history.extra.setdefault(name, []).append(frame)
        if self.on_log is not None:
            with eval_mode(self.model):
                self.on_log(step, self.model)

    def accumulate(self, step: int, index: list[int]) -> tuple[float, float]:
        """Micro-steps over the pairs ``index`` of one optimizer step: its loss and mean margin.
        Raises :class:`TrainingDivergedError` on a NaN or infinite loss."""
        cfg, d = self.cfg, self.data
        loss_total, margin_total = 0.0, 0.0
        for k in range(0, len(index), cfg.batch_size):
            part = index[k : k + cfg.batch_size]
            c, r = pair_batches(d.train, part, d.pad, _device_of(self.model))
            ref, ref_tok = d.references(part, c, r)
            try:
                loss, u_w, u_l, stats = preference_microstep(
                    self.model, self.objective, c, r, ref, len(index), cfg.train_stats, ref_tok
                )
            except FloatingPointError as exc:
                self.model.eval()
                value, history = float(exc.args[0]), self.history.result()
                raise TrainingDivergedError(step + 1, value, history) from None
            if stats is not None:
                table = condition_table(stats, stats["d_w"], stats["d_l"], eta=cfg.lr)
                table.insert(0, "pair", part)
                table.insert(0, "split", "train")
                table.insert(0, "step", step)
                self.history.pairs.append(table)
            loss_total += float(loss.detach())
            margin_total += float((u_w - u_l).detach().sum()) / len(index)
        return loss_total, margin_total


def _optimizer_step(
    run: _PreferenceRun, opt: torch.optim.Optimizer, base_lrs: list[float], step: int, index
) -> tuple[float, float]:
    """One optimizer step (warm-up, accumulation, clipping) with its row in the history."""
    device = _device_of(run.model)
    started = device_clock(device)
    for group, base_lr in zip(opt.param_groups, base_lrs, strict=True):
        group["lr"] = base_lr * _lr_factor(step, run.cfg.warmup_steps)
    opt.zero_grad(set_to_none=True)
    loss_total, margin_total = run.accumulate(step, index)
    grad_norm = float("nan")
    if run.cfg.max_grad_norm:
        grad_norm = float(nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.max_grad_norm))
    opt.step()
    run.history.steps.append(
        {
            "step": step + 1,
            "loss": loss_total,
            "train_margin": margin_total,
            "lr": opt.param_groups[0]["lr"],
            "grad_norm": grad_norm,
            "seconds": device_clock(device) - started,
        }
    )
    return loss_total, margin_total


def preference_optimization(
    model: nn.Module,
    tokenizer,
    train_pairs: Iterable[Any],
    eval_pairs: Iterable[Any],
    cfg: TrainConfig,
    probe_pairs: Iterable[Any] | None = None,
    on_log: Callable[[int, nn.Module], None] | None = None,
) -> RunResult:
    """Train ``model`` in place with ``cfg.loss``; log held-out and probe statistics.

    ``train_pairs``, ``eval_pairs`` and ``probe_pairs`` hold items with ``prompt``, ``chosen``
    and ``rejected`` (attributes or dict keys). The loss is averaged over the pairs of a step.
    ``on_log(step, model)`` is called at every logged step (step 0 included), in eval mode,
    for measurements of the caller's own. Raises :class:`TrainingDivergedError` (with the
    history so far) on a NaN or inf loss.
    """
    torch.manual_seed(cfg.seed)
    objective = get_objective(cfg.loss, **cfg.loss_params)
    data = _encode_with_references(
        model, tokenizer, objective, cfg, train_pairs, eval_pairs, probe_pairs
    )
    stats_fn = stats_method(cfg.stats_method) if data.probe and cfg.stats_method != "none" else None
    objective.prepare(model, (t for s in (*data.train.chosen, *data.train.rejected) for t in s))
    opt = _make_optimizer(model, cfg)
    if (group := objective.param_group()) is not None:
        opt.add_param_group(group)
    base_lrs = [g["lr"] for g in opt.param_groups]  # warm-up scales each group's own rate
    run = _PreferenceRun(model, tokenizer, objective, cfg, data, stats_fn, on_log)
    run.log(0)
    schedule = _batch_schedule(
        len(data.train), cfg.batch_size * cfg.grad_accum, cfg.steps, cfg.seed
    )
    bar = tqdm(schedule, desc=f"{objective.name}", disable=not cfg.progress)
    model.train()
    for step, index in enumerate(bar):
        loss_total, margin_total = _optimizer_step(run, opt, base_lrs, step, index)
        bar.set_postfix(loss=f"{loss_total:.3f}", margin=f"{margin_total:.2f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            run.log(step + 1)
    model.eval()
    return run.history.result()


def params_hash(params: dict[str, Any]) -> str:
    """A short stable hash of JSON-serializable run parameters."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cached_run(
    cache_dir: str | Path | None,
    params: dict[str, Any],
    run: Callable[[], dict[str, pd.DataFrame]],
) -> dict[str, pd.DataFrame]:
    """The frames cached for ``params``, or ``run()``'s frames, then cached as CSV files.

    The cache folder is ``cache_dir/<hash>``; its ``params.json`` is written last, so a folder
    without it (an interrupted run) is ignored and recomputed.
    """
    if cache_dir is None:
        return run()
    folder = Path(cache_dir) / params_hash(params)
    done = folder / "params.json"
    if done.exists():
        names = json.loads(done.read_text(encoding="utf-8"))["frames"]
        return {name: pd.read_csv(folder / f"{name}.csv") for name in names}
    frames = run()
    for name, frame in frames.items():
        atomic_write_text(folder / f"{name}.csv", frame.to_csv(index=False))
    atomic_write_json(done, {"params": params, "frames": list(frames)})
    return frames


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """``cfg`` as a plain dict (for hashing and provenance), without the progress flag."""
    out = asdict(cfg)
    out.pop("progress")
    return out
