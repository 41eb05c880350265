"""End-to-end experiments the notebooks share: data, model, SFT, then preference optimization.

:func:`sft_then_preference` runs the paper's recipe on the synthetic sentiment task or on any
preference file/dataset, logs what the paper plots (see :mod:`ge_utils.training`) and caches the
histories by the key of its :class:`ge_utils.spec.ExperimentSpec` (every field), so
re-executing a notebook with the same parameters does not retrain and a changed parameter always
does. :func:`over_seeds` runs a recipe for several seeds; :func:`pair_changes` gives the per-pair,
per-seed changes a takeaway's interval is computed over.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
import torch

from ge_utils.data import (
    PreferencePair,
    load_pairs,
    sentiment_pairs,
    sft_examples,
    suffix_of_length,
)
from ge_utils.fast_gradients import fast_gradient_stats, tokenwise_inner
from ge_utils.gradients import condition_table, one_step_change, pair_logps
from ge_utils.logprobs import (
    SequenceBatch,
    pad_id,
    prompt_ids,
    response_ids,
    sequence_logprobs,
    token_logprobs,
    tokenize,
)
from ge_utils.losses import get_loss
from ge_utils.mitigations import contrastive_mask, get_objective
from ge_utils.models import cache_dir, device_clock, load_model
from ge_utils.spec import ExperimentSpec
from ge_utils.training import (
    RunResult,
    TrainConfig,
    cached_run,
    encode_pairs,
    pair_batches,
    preference_microstep,
    preference_optimization,
    sft,
)

# In the key of every loss_comparison run: bumped when its greedy answers were batched (the same
# answers but for ties at float rounding), so cached runs of the per-prompt version are not mixed.
ANSWERS_VERSION = 2


@dataclass
class ExperimentResult:
    """``sft``: SFT loss per step; ``run``: the preference-optimization history; ``spec``: what
    produced them."""

    sft: pd.DataFrame
    run: RunResult
    spec: ExperimentSpec


def experiment_data(spec: ExperimentSpec) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Train and held-out pairs of ``spec``: ``dataset='synthetic'`` for the sentiment task,
    else a file or a Hugging Face dataset name (shuffled by the seed, then split)."""
    if spec.dataset == "synthetic":
        return sentiment_pairs(spec.n_train, spec.n_eval, spec.config, spec.suffix, seed=spec.seed)
    pairs = load_pairs(spec.dataset)
    random.Random(spec.seed).shuffle(pairs)
    if len(pairs) < spec.n_train + spec.n_eval:
        raise ValueError(
            f"{spec.dataset}: {len(pairs)} pairs, fewer than {spec.n_train} + {spec.n_eval}"
        )
    return pairs[: spec.n_train], pairs[spec.n_train : spec.n_train + spec.n_eval]


def _load(spec: ExperimentSpec):
    """The spec's model (dtype, device, LoRA or trainable blocks, seed of a tiny model)."""
    return load_model(
        spec.model,
        dtype=spec.dtype,
        device=spec.device,
        lora=spec.lora,
        train_last_k=spec.train_last_k,
        seed=spec.seed,
    )


def _runs_dir(cache: bool):
    return cache_dir() / "runs" if cache else None


def sft_then_preference(spec: ExperimentSpec, cache: bool = True) -> ExperimentResult:
    """SFT on the chosen responses of the training pairs, then preference optimization.

    The probe set (gradient statistics) is the first ``spec.n_probe`` held-out pairs. With
    ``cache`` the result is stored under ``cache_dir()/runs/<hash of spec.key()>`` and reused.
    """

    def run() -> dict[str, pd.DataFrame]:
        torch.manual_seed(spec.seed)
        train, held = experiment_data(spec)
        loaded = _load(spec)
        sft_hist = pd.DataFrame({"step": [], "sft_loss": []})
        if spec.sft is not None:  # None: the model is already fine-tuned (e.g. an Instruct model)
            sft_hist = sft(loaded.model, loaded.tokenizer, sft_examples(train), spec.sft)
        result = preference_optimization(
            loaded.model, loaded.tokenizer, train, held, spec.po, probe_pairs=held[: spec.n_probe]
        )
        return {"sft": sft_hist, **result.frames()}

    frames = cached_run(_runs_dir(cache), spec.key(kind="sft_then_preference"), run)
    return ExperimentResult(frames["sft"], RunResult(frames["steps"], frames["pairs"]), spec)


def over_seeds(
    recipe: Callable[..., Any], spec: ExperimentSpec, seeds: Sequence[int], **kwargs: Any
) -> dict[int, Any]:
    """``recipe(spec.with_seed(s), **kwargs)`` for every seed in ``seeds``, keyed by seed."""
    if not seeds:
        raise ValueError("seeds is empty: give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat: {list(seeds)}")
    return {int(s): recipe(spec.with_seed(int(s)), **kwargs) for s in seeds}


def pairs_over_seeds(runs: Mapping[int, RunResult], split: str = "eval") -> pd.DataFrame:
    """Every run's pair rows of ``split``, with a ``seed`` column."""
    frames = [r.pairs[r.pairs["split"] == split].assign(seed=s) for s, r in runs.items()]
    return pd.concat(frames, ignore_index=True)


def pair_changes(runs: Mapping[int, RunResult], split: str = "eval") -> pd.DataFrame:
    """Per (seed, pair) of ``split``: the change of ``logp_chosen``, ``logp_rejected`` and
    ``margin`` from the first to the last logged step (columns ``d_chosen``, ``d_rejected``,
    ``d_margin``, and the starting ``logp_chosen``/``logp_rejected``)."""
    rows = []
    for seed, run in runs.items():
        sub = run.pairs[run.pairs["split"] == split].sort_values("step")
        if sub.empty:
            raise ValueError(f"seed {seed}: the run logged no {split!r} pairs")
        first = sub[sub["step"] == sub["step"].min()].set_index("pair")
        last = sub[sub["step"] == sub["step"].max()].set_index("pair")
        for pair in first.index:
            rows.append(
                {
                    "seed": seed,
                    "pair": pair,
                    "start_chosen": first.at[pair, "logp_chosen"],
                    "start_rejected": first.at[pair, "logp_rejected"],
                    "d_chosen": last.at[pair, "logp_chosen"] - first.at[pair, "logp_chosen"],
                    "d_rejected": last.at[pair, "logp_rejected"] - first.at[pair, "logp_rejected"],
                    "d_margin": last.at[pair, "margin"] - first.at[pair, "margin"],
                }
            )
    return pd.DataFrame(rows)


def condition_study(
    spec: ExperimentSpec,
    losses: list[str],
    step_sizes: Sequence[float] = (1e-3,),
    cache: bool = True,
) -> pd.DataFrame:
    """Predicted against realized one-step changes, at every logged checkpoint of a DPO run.

    After SFT (whose model is the reference), DPO trains with ``spec.po``; at each logged step,
    for the ``spec.n_eval`` held-out pairs and each loss in ``losses``: the statistics (fast
    method), the first-order predictions and case, and the realized changes after one plain SGD
    step on each pair alone (:func:`ge_utils.gradients.one_step_change`), for each target in
    ``step_sizes``: the step size ``eta`` is set so that the median predicted ``|Delta u_w|`` is
    ``step_size`` nats. A tiny target checks the statistics (Taylor's theorem makes the first
    order exact in the limit); a target the size of a training step's effect asks whether the
    condition still predicts the direction. One row per (step, loss, step_size, pair).
    """
    for name in losses:
        get_loss(name)
    if not step_sizes or any(not (x > 0) for x in step_sizes):
        raise ValueError(f"step_sizes must be positive numbers, got {list(step_sizes)}")

    def run() -> dict[str, pd.DataFrame]:
        torch.manual_seed(spec.seed)
        train, held = experiment_data(spec)
        net, tok = _fine_tuned(spec, train)
        dev = next(net.parameters()).device
        prompts = [p.prompt for p in held]
        c = tokenize(tok, prompts, [p.chosen for p in held], spec.po.template).to(dev)
        r = tokenize(tok, prompts, [p.rejected for p in held], spec.po.template).to(dev)
        with torch.no_grad():
            ref = (sequence_logprobs(net.eval(), c), sequence_logprobs(net, r))
        frames: list[pd.DataFrame] = []

        def measure(step: int, m: torch.nn.Module) -> None:
            stats = fast_gradient_stats(m, c, r)
            for name in losses:
                loss = get_loss(name)
                d_w, d_l = loss.coefficients(
                    pair_logps(stats["logp_chosen"], stats["logp_rejected"], c, r, ref)
                )
                unit = condition_table(stats, d_w, d_l).pred_delta_chosen.abs().median()
                for step_size in step_sizes:
                    eta = step_size / unit if unit > 0 else step_size
                    table = condition_table(stats, d_w, d_l, eta)
                    realized = one_step_change(m, c, r, loss, eta, ref)
                    table = table.join(realized.drop(columns="pair"))
                    table.insert(0, "pair", range(len(table)))
                    table.insert(0, "eta", eta)
                    table.insert(0, "step_size", step_size)
                    table.insert(0, "loss", name)
                    table.insert(0, "step", step)
                    frames.append(table)

        result = preference_optimization(net, tok, train, held, spec.po, on_log=measure)
        return {"condition": pd.concat(frames, ignore_index=True), **result.frames()}

    key = spec.key(kind="condition_study", losses=list(losses), step_sizes=list(step_sizes))
    return cached_run(_runs_dir(cache), key, run)["condition"]


def _fine_tuned(spec: ExperimentSpec, train: list[PreferencePair]):
    """The spec's model after its SFT phase on ``train``'s chosen responses (eval mode)."""
    loaded = _load(spec)
    if spec.sft is not None:
        sft(loaded.model, loaded.tokenizer, sft_examples(train), spec.sft)
    return loaded.model.eval(), loaded.tokenizer


def suffix_sweep(spec: ExperimentSpec, lengths: list[int]) -> pd.DataFrame:
    """Gradient statistics of the same statements with suffixes of growing length.

    The model is fine-tuned once (``spec.sft``) on the gold answers of ``spec.config``; then, for
    each ``k`` in ``lengths``, the ``spec.n_eval`` held-out pairs get responses
    ``Positive``/``Negative`` followed by the first ``k`` words of
    :data:`ge_utils.data.SWEEP_WORDS` and a period. One row per (k, pair).
    """
    train, _ = experiment_data(replace(spec, n_eval=0, n_probe=0))
    net, tok = _fine_tuned(spec, train)
    dev = next(net.parameters()).device
    template = spec.po.template
    frames = []
    for k in lengths:
        _, held = sentiment_pairs(
            spec.n_train, spec.n_eval, suffix=suffix_of_length(k), seed=spec.seed
        )
        prompts = [p.prompt for p in held]
        c = tokenize(tok, prompts, [p.chosen for p in held], template).to(dev)
        r = tokenize(tok, prompts, [p.rejected for p in held], template).to(dev)
        stats = fast_gradient_stats(net, c, r)
        table = condition_table(stats, torch.ones(len(held)), torch.ones(len(held)))
        table.insert(0, "response_tokens", c.response_lengths.cpu().numpy())
        table.insert(0, "pair", range(len(held)))
        table.insert(0, "suffix_words", k)
        frames.append(table)
    return pd.concat(frames, ignore_index=True)


def tokenwise_study(spec: ExperimentSpec) -> dict[str, Any]:
    """Token-wise inner products and cosines (chosen tokens x rejected tokens, all parameters)
    of the ``spec.n_eval`` held-out pairs, after SFT (step 0) and after DPO with ``spec.po``.

    Returns ``{"tokens": (chosen_tokens, rejected_tokens) per pair, "matrices": DataFrame,
    "contrastive": (chosen mask, rejected mask) per pair}``; the frame has one row per (step,
    pair, chosen index, rejected index): ``inner``, ``cosine``, the pair's sequence-level
    ``norm2_chosen`` and ``norm2_rejected`` (``|g_w|^2``, ``|g_l|^2``: the sums of the
    chosen x chosen and rejected x rejected matrices, so ``inner / sqrt(norm2_chosen *
    norm2_rejected)`` is the cell's part of the sequence cosine), and ``cell``: ``contrastive``
    (the same response index, where chosen and rejected differ:
    :func:`ge_utils.mitigations.contrastive_mask`), ``shared`` (the same response index holding
    the same token: the diagonal of identical tokens) or ``other`` (off the diagonal).
    """
    train, held = experiment_data(spec)
    net, tok = _fine_tuned(spec, train)
    dev = next(net.parameters()).device
    batches = [
        (
            tokenize(tok, [p.prompt], [p.chosen], spec.po.template).to(dev),
            tokenize(tok, [p.prompt], [p.rejected], spec.po.template).to(dev),
        )
        for p in held
    ]
    rows = []

    def measure(step: int, m: torch.nn.Module) -> None:
        for i, (c, r) in enumerate(batches):
            differs = contrastive_mask(c, r)[0][0][c.response_mask[0]].bool().tolist()
            inner = tokenwise_inner(m, c, r)
            gram_w, gram_l = tokenwise_inner(m, c, c), tokenwise_inner(m, r, r)
            norm_w, norm_l = gram_w.diagonal(), gram_l.diagonal()
            cosine = inner / (norm_w[:, None] * norm_l[None, :]).sqrt()
            seq_w, seq_l = float(gram_w.sum()), float(gram_l.sum())
            for s, t in itertools.product(range(inner.shape[0]), range(inner.shape[1])):
                rows.append(
                    {
                        "step": step,
                        "pair": i,
                        "chosen_index": s,
                        "rejected_index": t,
                        "inner": float(inner[s, t]),
                        "cosine": float(cosine[s, t]),
                        "norm2_chosen": seq_w,
                        "norm2_rejected": seq_l,
                        "cell": "other" if s != t else "contrastive" if differs[s] else "shared",
                    }
                )

    po_cfg_logged = replace(spec.po, eval_every=spec.po.steps, stats_method="none")
    preference_optimization(net, tok, train, held, po_cfg_logged, on_log=measure)
    tokens = [
        (
            [tok.decode([t]) for t in c.input_ids[0][c.response_mask[0]].tolist()],
            [tok.decode([t]) for t in r.input_ids[0][r.response_mask[0]].tolist()],
        )
        for c, r in batches
    ]
    return {"tokens": tokens, "matrices": pd.DataFrame(rows)}


@dataclass
class ComparisonResult:
    """Runs of several objectives from one SFT start, keyed by label.

    ``runs[label]``: the training history; ``tokens``: per (label, step, pair) held-out summed
    log-probs of the *contrastive* tokens (where chosen and rejected differ) and of the *shared*
    ones; ``answers``: per (label, step, pair) whether greedy decoding from the prompt gives the
    chosen answer token (``correct``) and the whole chosen response (``exact``), at the first
    and last logged steps.
    """

    runs: dict[str, RunResult]
    tokens: pd.DataFrame
    answers: pd.DataFrame

    def means(self, split: str = "eval") -> pd.DataFrame:
        """Per-step means of ``split`` for every run, with a ``loss`` column (the label)."""
        frames = [r.means(split).assign(loss=label) for label, r in self.runs.items()]
        return pd.concat(frames, ignore_index=True)

    def pairs(self, split: str) -> pd.DataFrame:
        """Every run's pair rows of ``split``, with a ``loss`` column."""
        frames = [
            r.pairs[r.pairs["split"] == split].assign(loss=label) for label, r in self.runs.items()
        ]
        return pd.concat(frames, ignore_index=True)

    def steps(self) -> pd.DataFrame:
        return pd.concat(
            [r.steps.assign(loss=label) for label, r in self.runs.items()], ignore_index=True
        )

    def summary(self) -> pd.DataFrame:
        """Per loss: change from the first to the last logged step of the mean held-out
        ``logp_chosen``, ``logp_rejected``, ``margin`` (summed, nats) and of the length-averaged
        log-probs (``avg_chosen``, ``avg_rejected``, nats per token)."""
        rows = []
        for label, run in self.runs.items():
            held = run.pairs[run.pairs["split"] == "eval"].copy()
            held["avg_chosen"] = held["logp_chosen"] / held["len_chosen"]
            held["avg_rejected"] = held["logp_rejected"] / held["len_rejected"]
            means = held.groupby("step")[
                ["logp_chosen", "logp_rejected", "margin", "avg_chosen", "avg_rejected"]
            ].mean()
            change = means.iloc[-1] - means.iloc[0]
            rows.append({"loss": label, **{f"delta_{k}": v for k, v in change.items()}})
        return pd.DataFrame(rows).set_index("loss")

    def train_means(self) -> pd.DataFrame:
        """Per (loss, step) means over the training pairs of ``d_ratio = d_w / d_l``, the
        squared norms and the inner product (losses with training statistics only)."""
        train = self.pairs("train")
        train = train.assign(d_ratio=train["d_w"] / train["d_l"])
        cols = ["d_ratio", "grad_norm2_chosen", "grad_norm2_rejected", "grad_inner", "cosine"]
        return train.groupby(["loss", "step"])[cols].mean().reset_index()


def _pair_batches(tok, pairs, template: str) -> tuple[SequenceBatch, SequenceBatch]:
    """Chosen and rejected batches of ``pairs`` on the CPU (row i of each is pair i)."""
    return pair_batches(encode_pairs(tok, pairs, template), range(len(pairs)), pad_id(tok), "cpu")


def _token_split(model, tok, held, template: str) -> pd.DataFrame:
    """Held-out summed log-probs of the contrastive and the shared response tokens."""
    device = next(model.parameters()).device
    c, r = (b.to(device) for b in _pair_batches(tok, held, template))
    with torch.no_grad():
        lp_w, lp_l = token_logprobs(model, c).double(), token_logprobs(model, r).double()
    m_w, m_l = (m.to(lp_w) for m in contrastive_mask(c, r))
    return pd.DataFrame(
        {
            "pair": range(len(held)),
            "contrastive_chosen": (lp_w * m_w).sum(1).cpu().numpy(),
            "shared_chosen": (lp_w * (1 - m_w) * c.response_mask).sum(1).cpu().numpy(),
            "contrastive_rejected": (lp_l * m_l).sum(1).cpu().numpy(),
            "shared_rejected": (lp_l * (1 - m_l) * r.response_mask).sum(1).cpu().numpy(),
        }
    )


def contrastive_token_ids(tok, pairs, template: str = "none") -> set[int]:
    """Vocabulary ids found at a contrastive position (where chosen and rejected differ, see
    :func:`ge_utils.mitigations.contrastive_mask`) of some pair."""
    c, r = _pair_batches(tok, pairs, template)
    m_w, m_l = contrastive_mask(c, r)
    return set(c.input_ids[m_w > 0].tolist()) | set(r.input_ids[m_l > 0].tolist())


def greedy_answers(model, tok, pairs, template: str = "none") -> pd.DataFrame:
    """Greedy continuation of each prompt, as long as its chosen response, compared by token
    ids: ``correct`` if it matches the chosen response up to its first token that differs from
    the rejected one (the answer), ``exact`` if it is the whole chosen response.

    One batched ``generate`` call: prompts left-padded and masked (the model derives positions
    from the mask), so each continuation is the one its prompt gets alone (tested)."""
    if not pairs:
        raise ValueError("no pairs to answer")
    device = next(model.parameters()).device
    pad = pad_id(tok)
    prompts = [prompt_ids(tok, p.prompt, template) for p in pairs]
    wants = [response_ids(tok, p.chosen) for p in pairs]
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(q)) + q for q in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in prompts], device=device)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max(map(len, wants)),
            do_sample=False,
            pad_token_id=pad,
        )
    rows = []
    for i, (p, want) in enumerate(zip(pairs, wants, strict=True)):
        other = response_ids(tok, p.rejected)
        decisive = next(
            (k for k in range(min(len(want), len(other))) if want[k] != other[k]),
            min(len(want), len(other)) - 1,
        )
        got = _until_eos(out[i, width : width + len(want)].tolist(), tok)
        rows.append(
            {
                "pair": i,
                "correct": got[: decisive + 1] == want[: decisive + 1],
                "exact": got == want,
                "answer": tok.decode(got),
            }
        )
    return pd.DataFrame(rows)


def _until_eos(ids: list[int], tok) -> list[int]:
    """A generated continuation cut after its end-of-sequence token (what generation alone
    returns: a finished row of a batch is padded after it)."""
    eos = tok.eos_token_id
    return ids[: ids.index(eos) + 1] if eos is not None and eos in ids else ids


def loss_comparison(
    spec: ExperimentSpec, objectives: dict[str, dict[str, float]], cache: bool = True
) -> ComparisonResult:
    """Train one copy of the spec's SFT model per objective (``{name: hyperparameters}``, any
    loss of :mod:`ge_utils.losses` or mitigation of :mod:`ge_utils.mitigations`) with
    ``spec.po`` (its ``loss`` replaced by each objective).

    Every run logs the held-out set (and, where the objective allows, every training pair's
    gradient statistics) each ``spec.po.eval_every`` steps, the contrastive/shared token split
    of the held-out log-probs and greedy answers at the first and last logged steps. Each run is
    cached by its own parameters; SFT runs once, only if some run is not cached.
    """
    if not objectives:
        raise ValueError("no objectives given: pass at least one {name: hyperparameters}")
    for name, hparams in objectives.items():
        get_objective(name, **hparams)  # clear errors before any training
    state: dict[str, Any] = {}

    def fine_tuned():
        if "model" not in state:
            torch.manual_seed(spec.seed)
            train, held = experiment_data(spec)
            loaded = _load(spec)
            sft_hist = pd.DataFrame({"step": [], "sft_loss": []})
            if spec.sft is not None:
                sft_hist = sft(loaded.model, loaded.tokenizer, sft_examples(train), spec.sft)
            weights = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
            state.update(model=loaded.model, tok=loaded.tokenizer, weights=weights)
            state.update(train=train, held=held, sft=sft_hist)
        net = state["model"]
        net.load_state_dict(state["weights"])
        return net, state["tok"], state["train"], state["held"]

    runs: dict[str, RunResult] = {}
    tokens, answers = [], []
    for name, hparams in objectives.items():
        objective = get_objective(name, **hparams)
        cfg = replace(
            spec.po,
            loss=name,
            loss_params=dict(objective.hyperparameters),  # defaults too: they key the cache
            train_stats=spec.po.train_stats and objective.reports_pair_stats,
        )

        def run(cfg: TrainConfig = cfg) -> dict[str, pd.DataFrame]:
            net, tok, train, held = fine_tuned()
            tok_rows, ans_rows = [], []

            def measure(step: int, m: torch.nn.Module) -> None:
                if step == 0 and "start" in state:  # every objective starts from the same model
                    tok_rows.append(state["start"][0])
                    ans_rows.append(state["start"][1])
                    return
                tok_rows.append(_token_split(m, tok, held, cfg.template).assign(step=step))
                if step in (0, cfg.steps):
                    ans_rows.append(greedy_answers(m, tok, held, cfg.template).assign(step=step))
                if step == 0:
                    state["start"] = (tok_rows[-1], ans_rows[-1])

            result = preference_optimization(net, tok, train, held, cfg, on_log=measure)
            frames = result.frames()
            if "mask" in frames:
                ids = contrastive_token_ids(tok, train, cfg.template)
                frames["mask"]["contrastive"] = frames["mask"]["token_id"].isin(ids)
            return {
                **frames,
                "tokens": pd.concat(tok_rows, ignore_index=True),
                "answers": pd.concat(ans_rows, ignore_index=True),
            }

        key = replace(spec, po=cfg).key(kind="loss_comparison", answers=ANSWERS_VERSION)
        frames = cached_run(_runs_dir(cache), key, run)
        extra = {
            k: v for k, v in frames.items() if k not in ("steps", "pairs", "tokens", "answers")
        }
        runs[name] = RunResult(frames["steps"], frames["pairs"], extra)
        tokens.append(frames["tokens"].assign(loss=name))
        answers.append(frames["answers"].assign(loss=name))
    return ComparisonResult(
        runs, pd.concat(tokens, ignore_index=True), pd.concat(answers, ignore_index=True)
    )


def direction_agreement(run: RunResult) -> pd.DataFrame:
    """Did the gradient condition predict where the held-out chosen log-prob went?

    For each interval between logged steps ``[t0, t1)``: ``predicted`` is the mean, over the
    training pairs of those steps, of the first-order change of each pair's own chosen log-prob
    (``eta (d_w |g_w|^2 - d_l <g_w, g_l>)``, positive iff ``<g_w, g_l> < (d_w/d_l) |g_w|^2``);
    ``realized`` is the change of the mean held-out chosen log-prob from ``t0`` to ``t1``;
    ``agree`` whether their signs match. Needs a run with ``train_stats``.
    """
    held = run.means("eval").set_index("step")["logp_chosen"]
    train = run.pairs[run.pairs["split"] == "train"]
    if train.empty:
        raise ValueError("the run has no training-pair statistics (train_stats=False)")
    logged = list(held.index)
    rows = []
    for t0, t1 in itertools.pairwise(logged):
        pred = train[(train["step"] >= t0) & (train["step"] < t1)]["pred_delta_chosen"].mean()
        real = held[t1] - held[t0]
        rows.append(
            {
                "from_step": t0,
                "to_step": t1,
                "predicted": pred,
                "realized": real,
                "agree": bool((pred > 0) == (real > 0)) if pd.notna(pred) else None,
            }
        )
    return pd.DataFrame(rows)


def realized_cases(run: RunResult) -> pd.DataFrame:
    """The realized case of every held-out pair over every interval between logged steps:
    1 chosen up and rejected down, 2 both down, 3 both up, 4 chosen down and rejected up (a
    change of exactly 0 counts as down). Columns ``step`` (interval start), ``pair``, ``case``."""
    held = run.pairs[run.pairs["split"] == "eval"].sort_values(["pair", "step"])
    d_w = held.groupby("pair")["logp_chosen"].diff()
    d_l = held.groupby("pair")["logp_rejected"].diff()
    start = held.groupby("pair")["step"].shift()
    up_w, up_l = d_w > 0, d_l > 0
    case = up_w.map({True: 1, False: 2}).where(~up_l, up_w.map({True: 3, False: 4}))
    out = pd.DataFrame({"step": start, "pair": held["pair"], "case": case})
    return out.dropna().astype({"step": int, "case": int}).reset_index(drop=True)


def step_costs(
    model: str,
    objectives: dict[str, dict[str, float]],
    batch_size: int = 4,
    repeats: int = 5,
    config: str = "long",
    template: str = "none",
    device: str = "auto",
    seed: int = 0,
) -> pd.DataFrame:
    """Wall time of one training micro-step (forward and backward, no optimizer update) per
    objective, measured side by side: the objectives take turns on the same model and batch,
    ``repeats`` rounds after one warm-up round. Returns per objective the median ``seconds``
    and ``ratio`` to the first objective. Never cached: it measures this machine now."""
    if not objectives:
        raise ValueError("no objectives given: pass at least one {name: hyperparameters}")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    built = {name: get_objective(name, **hp) for name, hp in objectives.items()}
    train, _ = sentiment_pairs(batch_size, 0, config, seed=seed)
    loaded = load_model(model, device=device, seed=seed)
    net, tok = loaded.model.train(), loaded.tokenizer
    dev = next(net.parameters()).device
    c, r = (b.to(dev) for b in _pair_batches(tok, train, template))
    with torch.no_grad():
        ref = (sequence_logprobs(net, c), sequence_logprobs(net, r))
        ref_tokens = (token_logprobs(net, c), token_logprobs(net, r))
    for objective in built.values():
        objective.prepare(net, [])  # a learned mask's logits; no token weights reported
    times: dict[str, list[float]] = {name: [] for name in built}
    for round_ in range(repeats + 1):
        for name, objective in built.items():
            net.zero_grad(set_to_none=True)
            started = device_clock(dev)
            preference_microstep(net, objective, c, r, ref, len(c), ref_tokens=ref_tokens)
            if round_ > 0:
                times[name].append(device_clock(dev) - started)
    net.zero_grad(set_to_none=True)
    median = pd.Series({name: float(pd.Series(t).median()) for name, t in times.items()})
    return pd.DataFrame({"seconds": median, "ratio": median / median.iloc[0]})
