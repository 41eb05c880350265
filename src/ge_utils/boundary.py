"""Where does the single-token result hold? A map of Theorem 1's boundary, and the suffix sweep.

Theorem 1 (PAPER.md §4) is a statement about one pair of single-token responses, the output
layer ``softmax(W h)`` with the hidden state ``h`` held fixed, and one plain gradient step. For
chosen token ``a`` and rejected token ``b`` the head gradients of ``u_a = log p_a`` satisfy

    |g_a|^2 - <g_a, g_b> = (1 - p_a + p_b) |h|^2 > 0,   |g_b|^2 - <g_a, g_b> = (1 - p_b + p_a) |h|^2

so with DPO's ``d_w = d_l = d > 0`` a step of size ``eta`` changes, to first order,
``Delta u_w = eta d (1 - p_a + p_b) |h|^2 > 0`` and ``Delta u_l = -eta d (1 - p_b + p_a) |h|^2
< 0``: the chosen log-prob rises and the rejected one falls, whatever the probabilities.

A training run leaves that setting along several factors, each a field of :class:`Cell`: the
trainable ``scope`` (``head``: an untied output layer only, the theorem's setting; ``last_k``:
the last k blocks and the final norm; ``all``), the ``optimizer`` (plain SGD or AdamW) and its
step size ``lr``, the ``batch`` (``pair``: each pair alone from the same start; ``mixed``: all
pairs in one batch), the number of ``steps``, the ``start`` (the model as it is, after a short
or a long SFT) and the ``response`` configuration (:data:`ge_utils.data.CONFIG_SUFFIXES`).

With a mixed batch of B pairs and plain SGD on the mean loss, ``grad L = (1/B) sum_j (-d_w^j
g_w^j + d_l^j g_l^j)``, so pair i's first-order change splits into its own term and the other
pairs' (cross-pair) terms (:func:`batch_step_terms`)::

    Delta u_w^i ~ (eta/B) [d_w^i |g_w^i|^2 - d_l^i <g_w^i, g_l^i>]                    (own)
                + (eta/B) sum_{j != i} [d_w^j <g_w^i, g_w^j> - d_l^j <g_w^i, g_l^j>]  (cross)

and likewise ``Delta u_l^i`` with ``g_l^i`` in place of ``g_w^i`` on the left. With single-token
responses every pair shares the two label tokens, with their roles swapped between positive and
negative statements, so the cross terms can outweigh the own term.

:func:`boundary_map` runs a list of cells for several seeds (one cached run per cell and seed,
:func:`ge_utils.training.cached_run`); :func:`suffix_length_sweep` measures the gradient
statistics of the same statements with shared suffixes of 0 to :data:`MAX_SUFFIX_WORDS` words.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import nn

from ge_utils.data import CONFIG_SUFFIXES, PreferencePair, sentiment_pairs, sft_examples
from ge_utils.fast_gradients import GhostRecorder, fast_gradient_stats, training_step_stats
from ge_utils.gradients import ParamSpec, pair_logps
from ge_utils.logprobs import SequenceBatch, concat_batches, eval_mode, sequence_logprobs, tokenize
from ge_utils.losses import MarginLoss, get_loss
from ge_utils.models import cache_dir, device_key, load_model, train_last_k_blocks
from ge_utils.spec import model_fingerprint
from ge_utils.training import TrainConfig, cached_run, config_dict, sft

BOUNDARY_VERSION = 1  # bump when a change of code changes results (old cached cells unused)
Scope = Literal["head", "last_k", "all"]
BatchMode = Literal["pair", "mixed"]
Start = Literal["pretrained", "short_sft", "long_sft"]
SCOPES: tuple[str, ...] = ("head", "last_k", "all")
STARTS: tuple[str, ...] = ("pretrained", "short_sft", "long_sft")
FACTORS: tuple[str, ...] = ("scope", "optimizer", "lr", "batch", "steps", "start", "response")
SUFFIX_WORDS = "sentiment based on my own careful judgement of the statement in every way".split()
MAX_SUFFIX_WORDS = len(SUFFIX_WORDS)


def shared_suffix(k: int) -> str:
    """The text after the label word shared by both responses: the first ``k`` words of
    :data:`SUFFIX_WORDS` and a period (``k = 0``: ``"."``)."""
    if not isinstance(k, int) or not 0 <= k <= MAX_SUFFIX_WORDS:
        raise ValueError(f"suffix length must be an integer in 0..{MAX_SUFFIX_WORDS}, got {k!r}")
    return "".join(" " + w for w in SUFFIX_WORDS[:k]) + "."


# --- trainable scope -------------------------------------------------------------------------


def untie_output_layer(model: nn.Module) -> bool:
    """Give the output layer its own weight (a copy) when it is tied to the input embedding.

    Afterwards training the head leaves the input embedding, hence the hidden states, as they
    were. Returns whether the weights were tied.
    """
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or emb is None or head.weight is not emb.weight:
        return False
    head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    model.config.tie_word_embeddings = False
    return True


def set_scope(model: nn.Module, scope: Scope, last_k: int = 2) -> list[str]:
    """Make only ``scope`` trainable: ``head`` (the output layer, untied first, see
    :func:`untie_output_layer`), ``last_k`` (the last ``last_k`` blocks and the final norm;
    the head stays frozen) or ``all``. Returns the trainable parameter names."""
    if scope == "head":
        untie_output_layer(model)
        head = model.get_output_embeddings()
        for p in model.parameters():
            p.requires_grad_(False)
        for p in head.parameters():
            p.requires_grad_(True)
    elif scope == "last_k":
        train_last_k_blocks(model, last_k)
    elif scope == "all":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    return [n for n, p in model.named_parameters() if p.requires_grad]


# --- own and cross-pair terms of a batch step ---------------------------------------------------


def gradient_gram(
    model: nn.Module, chosen: SequenceBatch, rejected: SequenceBatch, params: ParamSpec = None
) -> torch.Tensor:
    """(2B, 2B) float64 Gram matrix ``<grad u_s, grad u_t>`` of the summed response log-probs of
    the sequences ``[chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}]`` over the
    parameter set, from one forward and one backward (ghost products, no gradient vector is
    stored). Eval mode; parameter ``.grad`` fields are left untouched."""
    if len(chosen) != len(rejected):
        raise ValueError(f"{len(chosen)} chosen but {len(rejected)} rejected sequences")
    joint = concat_batches(chosen, rejected)
    n = len(joint)
    ii, jj = torch.triu_indices(n, n)
    with eval_mode(model):
        with GhostRecorder(model, params, batch=joint) as rec:
            rec.expect(gram=(ii, jj))
            u = sequence_logprobs(model, joint)
            rec.backward(u.sum())
            values = rec.results()["gram"]
    gram = torch.zeros(n, n, dtype=torch.float64)
    gram[ii, jj] = values
    gram[jj, ii] = values
    return gram


def batch_step_terms(
    gram: torch.Tensor, d_w: torch.Tensor, d_l: torch.Tensor, eta: float
) -> pd.DataFrame:
    """Each pair's first-order change under one plain SGD step of size ``eta`` on the mean loss
    of a batch of B pairs (``grad L = (1/B) sum_j (-d_w^j g_w^j + d_l^j g_l^j)``), split into
    its own term (``j = i``) and the cross-pair terms (``j != i``); see the module docstring.

    ``gram``: (2B, 2B) from :func:`gradient_gram`; ``d_w``, ``d_l``: (B,). Columns
    ``pair, own_chosen, cross_chosen, pred_chosen, own_rejected, cross_rejected,
    pred_rejected`` (nats; ``pred = own + cross``).
    """
    d_w, d_l = d_w.double().cpu().flatten(), d_l.double().cpu().flatten()
    b = len(d_w)
    if gram.shape != (2 * b, 2 * b) or len(d_l) != b:
        raise ValueError(f"gram {tuple(gram.shape)} does not match {b} pairs")
    if not (math.isfinite(eta) and eta > 0):
        raise ValueError(f"eta must be a finite number > 0, got {eta!r}")
    g = gram.double()
    # contributions[i, j]: pair j's term in Delta u of sequence i (chosen rows, rejected rows)
    contrib_w = (eta / b) * (g[:b, :b] * d_w[None, :] - g[:b, b:] * d_l[None, :])
    contrib_l = (eta / b) * (g[b:, :b] * d_w[None, :] - g[b:, b:] * d_l[None, :])
    own_w, own_l = contrib_w.diagonal(), contrib_l.diagonal()
    return pd.DataFrame(
        {
            "pair": range(b),
            "own_chosen": own_w.numpy(),
            "cross_chosen": (contrib_w.sum(1) - own_w).numpy(),
            "pred_chosen": contrib_w.sum(1).numpy(),
            "own_rejected": own_l.numpy(),
            "cross_rejected": (contrib_l.sum(1) - own_l).numpy(),
            "pred_rejected": contrib_l.sum(1).numpy(),
        }
    )


# --- the grid ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One cell of the boundary map (see the module docstring for each factor)."""

    scope: Scope = "head"
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 1e-2
    batch: BatchMode = "pair"
    steps: int = 1
    start: Start = "pretrained"
    response: str = "single_bare"

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if self.batch not in ("pair", "mixed"):
            raise ValueError(f"batch must be 'pair' or 'mixed', got {self.batch!r}")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if self.start not in STARTS:
            raise ValueError(f"start must be one of {', '.join(STARTS)}, got {self.start!r}")
        if self.response not in CONFIG_SUFFIXES:
            known = ", ".join(CONFIG_SUFFIXES)
            raise ValueError(f"response must be one of {known}, got {self.response!r}")

    def label(self) -> str:
        return (
            f"{self.scope}/{self.optimizer}/lr {self.lr:g}/{self.batch}/{self.steps} step"
            f"{'s' if self.steps > 1 else ''}/{self.start}/{self.response}"
        )


@dataclass(frozen=True)
class GridSetup:
    """What every cell shares: the model, the data sizes, the SFT starts and DPO's beta.

    Per seed: ``n_sft`` statements for SFT (on their gold answers in the cell's response
    configuration), ``n_pairs`` other pairs that the DPO steps are taken on, ``n_eval`` further
    held-out pairs (measured in mixed-batch cells). ``short_sft`` and ``long_sft`` are SFT
    runs of ``short_sft_steps`` and ``long_sft_steps`` steps (AdamW, ``sft_lr``, batches of
    ``sft_batch``); ``pretrained`` is the model as loaded.
    """

    model: str = "tiny-llama"
    n_pairs: int = 8
    n_eval: int = 8
    n_sft: int = 32
    short_sft_steps: int = 6
    long_sft_steps: int = 24
    sft_lr: float = 2e-5
    sft_batch: int = 4
    beta: float = 0.1
    last_k: int = 2
    template: str = "none"
    dtype: str = "float32"
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("n_pairs", "n_sft", "short_sft_steps", "long_sft_steps", "sft_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.n_eval, int) or self.n_eval < 0:
            raise ValueError(f"n_eval must be a non-negative integer, got {self.n_eval!r}")
        if self.long_sft_steps <= self.short_sft_steps:
            raise ValueError("long_sft_steps must exceed short_sft_steps")
        get_loss("dpo", beta=self.beta)


@dataclass
class BoundaryResult:
    """``pairs``: one row per (cell, seed, split, pair) with the cell's factors as columns,
    the log-probs at the start (``logp0_*``), the realized changes (``delta_*``), the start's
    gradient statistics (``inner0``, ``cosine0``, ...) and, for SGD cells, the first-order
    prediction split into own and cross-pair terms (split ``stepped``: the pairs the steps were
    taken on; ``held_out``: pairs never stepped on, mixed batches only). ``trace``: one row per
    (cell, seed, step, pair) of the stepped pairs' statistics before the first step (traced cells:
    before every step)."""

    pairs: pd.DataFrame
    trace: pd.DataFrame
    cells: list[Cell] = field(default_factory=list)

    def summary(self, split: str = "stepped") -> pd.DataFrame:
        """Per cell: mean start log-prob of the chosen, mean realized and predicted changes,
        the share of pairs in case 1 (chosen up, rejected down) and the mean start cosine."""
        sub = self.pairs[self.pairs["split"] == split].copy()
        sub["case1"] = (sub["delta_chosen"] > 0) & (sub["delta_rejected"] < 0)
        cols = {
            "logp0_chosen": "mean",
            "delta_chosen": "mean",
            "delta_rejected": "mean",
            "pred_chosen": "mean",
            "pred_rejected": "mean",
            "own_chosen": "mean",
            "cross_chosen": "mean",
            "case1": "mean",
            "cosine0": "mean",
            "pair": "count",
        }
        out = sub.groupby("cell", sort=False).agg(cols).rename(columns={"pair": "n"})
        return out


def _pairs_for(setup: GridSetup, response: str, seed: int):
    sft_pool, rest = sentiment_pairs(setup.n_sft, setup.n_pairs + setup.n_eval, response, seed=seed)
    return sft_pool, rest[: setup.n_pairs], rest[setup.n_pairs :]


def _batches(tok, pairs: Sequence[PreferencePair], template: str, device) -> tuple:
    prompts = [p.prompt for p in pairs]
    c = tokenize(tok, prompts, [p.chosen for p in pairs], template).to(device)
    r = tokenize(tok, prompts, [p.rejected for p in pairs], template).to(device)
    return c, r


@torch.no_grad()
def _logps(model: nn.Module, c: SequenceBatch, r: SequenceBatch) -> tuple[torch.Tensor, ...]:
    model.eval()
    u = sequence_logprobs(model, concat_batches(c, r)).double().cpu()
    return u[: len(c)], u[len(c) :]


def _optimizer(model: nn.Module, cell: Cell) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cell.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cell.lr)
    return torch.optim.AdamW(params, lr=cell.lr, weight_decay=0.0)


def _train(
    model: nn.Module,
    loss_fn: MarginLoss,
    c: SequenceBatch,
    r: SequenceBatch,
    ref: tuple[torch.Tensor, torch.Tensor],
    cell: Cell,
    trace: bool = False,
) -> pd.DataFrame:
    """``cell.steps`` optimizer steps on the mean DPO loss of the batch ``(c, r)``; returns each
    pair's gradient statistics before the first step (with ``trace``: before every step), from
    that step's own backward (the statistics leave the gradients as they are)."""
    opt = _optimizer(model, cell)
    dev = next(model.parameters()).device
    ref_dev = (ref[0].to(dev), ref[1].to(dev))
    rows = []
    model.eval()  # no dropout: the realized change is the gradient step's alone
    for step in range(cell.steps):
        opt.zero_grad(set_to_none=True)

        def mean_loss(u_w: torch.Tensor, u_l: torch.Tensor) -> torch.Tensor:
            return loss_fn.loss(pair_logps(u_w, u_l, c, r, ref_dev)).mean()

        if step > 0 and not trace:
            u = sequence_logprobs(model, concat_batches(c, r))
            mean_loss(u[: len(c)], u[len(c) :]).backward()
            opt.step()
            continue
        _, st = training_step_stats(model, c, r, mean_loss)
        opt.step()
        n_w, n_l, inner = st["norm2_chosen"], st["norm2_rejected"], st["inner"]
        rows.append(
            pd.DataFrame(
                {
                    "step": step,
                    "pair": range(len(c)),
                    "logp_chosen": st["logp_chosen"].numpy(),
                    "logp_rejected": st["logp_rejected"].numpy(),
                    "norm2_chosen": n_w.numpy(),
                    "norm2_rejected": n_l.numpy(),
                    "inner": inner.numpy(),
                    "cosine": (inner / (n_w * n_l).sqrt()).numpy(),
                    "d_w": (-st["coef_chosen"] * len(c)).numpy(),
                    "d_l": (st["coef_rejected"] * len(c)).numpy(),
                }
            )
        )
    opt.zero_grad(set_to_none=True)
    return pd.concat(rows, ignore_index=True)


class _StartCache:
    """The start weights of the last (start, response, seed) asked for (one held at a time)."""

    def __init__(self, setup: GridSetup):
        self.setup = setup
        self.key: tuple | None = None
        self.state: dict[str, torch.Tensor] | None = None

    def model(self, start: str, response: str, seed: int) -> tuple[nn.Module, Any]:
        s = self.setup
        loaded = load_model(s.model, dtype=s.dtype, device=s.device, seed=seed)
        key = (start, response, seed)
        if start == "pretrained":
            return loaded.model.eval(), loaded.tokenizer
        if self.key != key:
            sft_pool, _, _ = _pairs_for(s, response, seed)
            steps = s.short_sft_steps if start == "short_sft" else s.long_sft_steps
            cfg = TrainConfig(
                steps=steps,
                batch_size=s.sft_batch,
                lr=s.sft_lr,
                seed=seed,
                template=s.template,
                progress=False,
            )
            sft(loaded.model, loaded.tokenizer, sft_examples(sft_pool), cfg)
            self.state = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
            self.key = key
            return loaded.model.eval(), loaded.tokenizer
        assert self.state is not None
        loaded.model.load_state_dict(self.state)
        return loaded.model.eval(), loaded.tokenizer


def _run_cell(
    cell: Cell, setup: GridSetup, seed: int, starts: _StartCache, every_step: bool
) -> dict:
    torch.manual_seed(seed)
    model, tok = starts.model(cell.start, cell.response, seed)
    set_scope(model, cell.scope, setup.last_k)
    loss_fn = get_loss("dpo", beta=setup.beta)
    dev = next(model.parameters()).device
    _, stepped, held = _pairs_for(setup, cell.response, seed)
    c, r = _batches(tok, stepped, setup.template, dev)
    u0 = _logps(model, c, r)  # the start is the reference: rewards 0, d_w = d_l = beta / 2
    trainable = [p for p in model.parameters() if p.requires_grad]
    theta0 = [p.detach().clone() for p in trainable]
    rows: dict[str, Any] = {}
    traces = []
    if cell.batch == "pair":
        after_w, after_l = [], []
        for i in range(len(stepped)):
            with torch.no_grad():
                for p, s in zip(trainable, theta0, strict=True):
                    p.copy_(s)
            ci, ri = c.select([i]), r.select([i])
            ref_i = (u0[0][i : i + 1], u0[1][i : i + 1])
            trace = _train(model, loss_fn, ci, ri, ref_i, cell, every_step)
            traces.append(trace.assign(pair=i))
            a_w, a_l = _logps(model, ci, ri)
            after_w.append(float(a_w[0]))
            after_l.append(float(a_l[0]))
        trace = pd.concat(traces, ignore_index=True)
        first = trace[trace["step"] == 0].set_index("pair").sort_index()
        n_w, n_l, inner = first["norm2_chosen"], first["norm2_rejected"], first["inner"]
        own_w = cell.lr * (first["d_w"] * n_w - first["d_l"] * inner)
        own_l = cell.lr * (first["d_w"] * inner - first["d_l"] * n_l)
        terms = pd.DataFrame(
            {
                "own_chosen": own_w.values,
                "cross_chosen": 0.0,
                "pred_chosen": own_w.values,
                "own_rejected": own_l.values,
                "cross_rejected": 0.0,
                "pred_rejected": own_l.values,
            }
        )
        delta = (np.array(after_w) - u0[0].numpy(), np.array(after_l) - u0[1].numpy())
    else:
        terms = None
        if cell.optimizer == "sgd":
            gram = gradient_gram(model, c, r)
            d = torch.full((len(stepped),), 0.5 * setup.beta, dtype=torch.float64)
            terms = batch_step_terms(gram, d, d, cell.lr).drop(columns="pair")
        h0 = _logps(model, *_batches(tok, held, setup.template, dev)) if held else None
        trace = _train(model, loss_fn, c, r, u0, cell, every_step)
        a_w, a_l = _logps(model, c, r)
        delta = ((a_w - u0[0]).numpy(), (a_l - u0[1]).numpy())
        if h0 is not None:
            h1 = _logps(model, *_batches(tok, held, setup.template, dev))
            rows["held_out"] = pd.DataFrame(
                {
                    "pair": range(len(held)),
                    "logp0_chosen": h0[0].numpy(),
                    "logp0_rejected": h0[1].numpy(),
                    "delta_chosen": (h1[0] - h0[0]).numpy(),
                    "delta_rejected": (h1[1] - h0[1]).numpy(),
                }
            )
    first = trace[trace["step"] == 0].set_index("pair").sort_index()
    stepped_rows = pd.DataFrame(
        {
            "pair": range(len(stepped)),
            "label": [p.label for p in stepped],
            "logp0_chosen": u0[0].numpy(),
            "logp0_rejected": u0[1].numpy(),
            "delta_chosen": delta[0],
            "delta_rejected": delta[1],
            "norm2_chosen0": first["norm2_chosen"].values,
            "norm2_rejected0": first["norm2_rejected"].values,
            "inner0": first["inner"].values,
            "cosine0": first["cosine"].values,
        }
    )
    if terms is not None:
        stepped_rows = pd.concat([stepped_rows, terms.reset_index(drop=True)], axis=1)
    frames = [stepped_rows.assign(split="stepped")]
    if "held_out" in rows:
        frames.append(rows["held_out"].assign(split="held_out"))
    return {"pairs": pd.concat(frames, ignore_index=True), "trace": trace}


def cell_params(cell: Cell, setup: GridSetup, seed: int, trace: bool) -> dict[str, Any]:
    """Everything that determines a cell's result (its cache key)."""
    return {
        "kind": "boundary_cell",
        "cell": asdict(cell),
        "trace": trace,
        "setup": {**asdict(setup), **device_key(setup.device)},
        **model_fingerprint(setup.model),  # a local folder's content, a Hub name's revision
        "seed": seed,
        "sft_config": config_dict(
            TrainConfig(batch_size=setup.sft_batch, lr=setup.sft_lr, template=setup.template)
        ),
        "version": BOUNDARY_VERSION,
    }


def boundary_map(
    cells: Sequence[Cell],
    setup: GridSetup,
    seeds: Sequence[int],
    trace_cells: Sequence[Cell] = (),
    cache: bool = True,
) -> BoundaryResult:
    """Run every cell for every seed (each (cell, seed) cached on its own parameters) and
    collect the results with the cell's factors, its ``label`` and the seed as columns.
    Cells in ``trace_cells`` record the statistics before every step (the others before the
    first only). Cells sharing a start are run one after another so each SFT start is trained
    once."""
    if not cells:
        raise ValueError("no cells given")
    if not seeds:
        raise ValueError("no seeds given")
    unique = list(dict.fromkeys(cells))
    starts = _StartCache(setup)
    traced = set(trace_cells)
    order = sorted(
        ((seed, cell) for seed in seeds for cell in unique),
        key=lambda sc: (sc[0], sc[1].response, STARTS.index(sc[1].start)),
    )
    pairs, traces = [], []
    for seed, cell in order:
        frames = cached_run(
            cache_dir() / "runs" if cache else None,
            cell_params(cell, setup, seed, cell in traced),
            lambda cell=cell, seed=seed: _run_cell(cell, setup, seed, starts, cell in traced),
        )
        tags = {"cell": cell.label(), "seed": seed, **asdict(cell)}
        pairs.append(frames["pairs"].assign(**tags))
        traces.append(frames["trace"].assign(**tags))
    return BoundaryResult(
        pd.concat(pairs, ignore_index=True), pd.concat(traces, ignore_index=True), unique
    )


def one_factor_cells(
    theorem: Cell,
    run: Cell,
    lr_factors: Sequence[float] = (0.1, 10.0),
    extra: dict[str, Sequence[Any]] | None = None,
) -> list[Cell]:
    """The slices of the map around two anchors, the theorem's cell and the training run's.

    Each anchor, then each anchor with one factor set to the other anchor's value (``scope``,
    ``optimizer`` with its ``lr``, ``batch``, ``steps``, ``start``); and the theorem's cell with
    its step size times each of ``lr_factors`` and with each value of ``extra``
    (``{"scope": ["last_k"], "response": [...]}``).
    Order kept, duplicates dropped; :func:`slice_table` names each cell's row."""
    for factor in extra or {}:
        if factor not in FACTORS or factor == "lr":
            raise ValueError(
                f"unknown extra factor {factor!r}; known: scope, optimizer, batch, "
                "steps, start, response (step sizes go in lr_factors)"
            )
    if any(not (math.isfinite(f) and f > 0) for f in lr_factors):
        raise ValueError(f"lr_factors must be positive finite numbers, got {lr_factors!r}")
    return [cell for cell, _, _ in _slices(theorem, run, lr_factors, extra or {})]


def _slices(
    theorem: Cell, run: Cell, lr_factors: Sequence[float], extra: dict[str, Sequence[Any]]
) -> list[tuple[Cell, str, str]]:
    out: list[tuple[Cell, str, str]] = []
    for name, anchor, other in (("theorem cell", theorem, run), ("training run", run, theorem)):
        out.append((anchor, name, "anchor"))
        for factor in ("scope", "optimizer", "batch", "steps", "start"):
            changes = {factor: getattr(other, factor)}
            if factor == "optimizer":
                changes["lr"] = other.lr
            value = (
                f"{other.optimizer} lr {other.lr:g}" if factor == "optimizer" else (changes[factor])
            )
            out.append((replace(anchor, **changes), name, f"{factor}: {value} (swap)"))
    for f in lr_factors:
        out.append((replace(theorem, lr=theorem.lr * f), "theorem cell", f"lr x{f:g}"))
    for factor, values in extra.items():
        out += [(replace(theorem, **{factor: v}), "theorem cell", f"{factor}: {v}") for v in values]
    seen: set[tuple[Cell, str]] = set()
    unique = []
    for cell, name, row in out:
        if (cell, name) not in seen:
            seen.add((cell, name))
            unique.append((cell, name, row))
    return unique


def slice_table(
    theorem: Cell,
    run: Cell,
    lr_factors: Sequence[float] = (0.1, 10.0),
    extra: dict[str, Sequence[Any]] | None = None,
) -> pd.DataFrame:
    """The layout of the map: one row per (anchor, slice) with columns ``anchor`` (``theorem
    cell`` or ``training run``), ``row`` (``anchor``, ``<factor>: <value> (swap)`` for a
    factor set to the other anchor's value, ``lr x<f>``, ``<factor>: <value>``) and ``cell``
    (the cell's label, as in :class:`BoundaryResult`)."""
    rows = _slices(theorem, run, lr_factors, extra or {})
    return pd.DataFrame([{"anchor": a, "row": r, "cell": c.label()} for c, a, r in rows])


# --- suffix length -----------------------------------------------------------------------------


def suffix_length_sweep(
    model: str,
    sft_cfg: TrainConfig | None,
    lengths: Sequence[int],
    n_pairs: int = 32,
    n_train: int = 32,
    template: str = "none",
    device: str = "auto",
    seed: int = 0,
    chunk: int = 8,
    cache: bool = True,
) -> pd.DataFrame:
    """Gradient statistics (all parameters) of the same held-out statements with responses
    ``Positive``/``Negative`` followed by :func:`shared_suffix` of ``k`` words, for each ``k``
    in ``lengths``, on one model fine-tuned on the ``n_train`` training statements' answers
    with the longest suffix (``sft_cfg=None``: the model as it is).

    One row per (k, pair): ``response_tokens`` (chosen), ``grad_inner``, ``inner_per_token``
    (``<g_w, g_l> / (|y_w| |y_l|)``: the inner product of the length-averaged log-probs'
    gradients), ``cosine`` and the squared norms. Pairs go ``chunk`` at a time through the fast
    statistics; the table is cached by every argument.
    """
    lengths = [int(k) for k in lengths]
    for k in lengths:
        shared_suffix(k)
    if n_pairs < 2 or chunk < 1:
        raise ValueError(f"need n_pairs >= 2 and chunk >= 1, got {n_pairs}, {chunk}")
    params = {
        "kind": "suffix_length_sweep",
        "model": model,
        **model_fingerprint(model),
        "sft": config_dict(sft_cfg) if sft_cfg is not None else None,
        "lengths": lengths,
        "n_pairs": n_pairs,
        "n_train": n_train,
        "template": template,
        **device_key(device),
        "seed": seed,
        "words": list(SUFFIX_WORDS),
        "version": BOUNDARY_VERSION,
    }

    def run() -> dict[str, pd.DataFrame]:
        torch.manual_seed(seed)
        loaded = load_model(model, device=device, seed=seed)
        net, tok = loaded.model, loaded.tokenizer
        train, _ = sentiment_pairs(n_train, 0, suffix=shared_suffix(max(lengths)), seed=seed)
        if sft_cfg is not None:
            sft(net, tok, sft_examples(train), sft_cfg)
        dev = next(net.parameters()).device
        frames = []
        for k in lengths:
            _, held = sentiment_pairs(n_train, n_pairs, suffix=shared_suffix(k), seed=seed)
            for start in range(0, n_pairs, chunk):
                part = held[start : start + chunk]
                c, r = _batches(tok, part, template, dev)
                st = fast_gradient_stats(net, c, r)
                t_w, t_l = c.response_lengths.double().cpu(), r.response_lengths.double().cpu()
                n_w, n_l, inner = st["norm2_chosen"], st["norm2_rejected"], st["inner"]
                frames.append(
                    pd.DataFrame(
                        {
                            "suffix_words": k,
                            "pair": range(start, start + len(part)),
                            "response_tokens": t_w.numpy(),
                            "grad_inner": inner.numpy(),
                            "inner_per_token": (inner / (t_w * t_l)).numpy(),
                            "cosine": (inner / (n_w * n_l).sqrt()).numpy(),
                            "grad_norm2_chosen": n_w.numpy(),
                            "grad_norm2_rejected": n_l.numpy(),
                        }
                    )
                )
        return {"sweep": pd.concat(frames, ignore_index=True)}

    return cached_run(cache_dir() / "runs" if cache else None, params, run)["sweep"]


def length_spearman(lengths: Sequence[int]) -> Callable[..., float]:
    """A statistic for :func:`ge_utils.claims.bootstrap_interval`: given one array per suffix
    length (the same pairs, in the same order, at each length), Spearman's rho between the
    length and the per-pair values over every (length, pair) point (``scipy.stats.spearmanr``).
    Resampling pairs with ``paired=True`` keeps each statement's values together."""
    ks = np.asarray(lengths, dtype=float)

    def statistic(*per_length: np.ndarray) -> float:
        if len(per_length) != len(ks):
            raise ValueError(f"{len(per_length)} arrays for {len(ks)} lengths")
        x = np.concatenate([np.full(len(v), k) for k, v in zip(ks, per_length, strict=True)])
        y = np.concatenate(per_length)
        return float(stats.spearmanr(x, y).statistic)

    return statistic
