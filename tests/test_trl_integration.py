"""The TRL integration: training unchanged, metrics right, one process = two processes."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from datasets import Dataset
from hf_models import hf_model, use_rescaled_routers
from trl import DPOConfig, DPOTrainer

from ge_utils.data import sentiment_pairs
from ge_utils.logprobs import directional_logps
from ge_utils.losses import get_loss
from ge_utils.models import load_model
from ge_utils.stats import fast_gradient_stats
from ge_utils.trl_integration import (
    METRIC_NAMES,
    ProbeBatch,
    _StepRecorder,
    attach_entanglement_metrics,
    tokenize_probe,
)

HERE = Path(__file__).resolve().parent
TRAIN, PROBE = sentiment_pairs(16, 4, config="long")


def _data(pairs=TRAIN) -> Dataset:
    return Dataset.from_list(
        [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    )


def _trainer(tmp_path, lora=False, ref=True, **overrides) -> DPOTrainer:
    warnings.filterwarnings("ignore")
    lm = load_model("tiny-llama", device="cpu", lora_rank=4 if lora else None)
    ref_model = load_model("tiny-llama", device="cpu").model if ref else None
    cfg = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        logging_steps=2,
        learning_rate=1e-4,
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )  # TRL's defaults otherwise, gradient checkpointing included
    cfg.update(overrides)
    return DPOTrainer(
        model=lm.model,
        ref_model=ref_model,
        args=DPOConfig(**cfg),
        train_dataset=_data(),
        processing_class=lm.tokenizer,
    )


def _params(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize(
    "setting",
    [
        {"lora": False, "ref": True, "gradient_accumulation_steps": 2},
        {"lora": True, "ref": False, "gradient_checkpointing": False},
    ],
    ids=["full+ref+accumulation+checkpointing", "lora-no-ref"],
)
def test_training_unchanged_and_metrics_logged(tmp_path, setting):
    """Bit-identical parameters and TRL metrics with the integration on and off: it never
    writes a parameter, a ``.grad``, the optimizer or an RNG (the comparison is exact, not to a
    tolerance, because both runs do the same floating-point operations in the same order)."""
    runs = {}
    for on in (False, True):
        torch.manual_seed(123)
        trainer = _trainer(tmp_path / str(on), **setting)
        callback = attach_entanglement_metrics(trainer, probe=PROBE) if on else None
        trainer.train()
        runs[on] = (trainer, callback)
    (off, _), (on, callback) = runs[False], runs[True]
    p_off, p_on = _params(off), _params(on)
    assert p_off.keys() == p_on.keys()
    assert all(torch.equal(p_off[k], p_on[k]) for k in p_off)
    logs_off = [h for h in off.state.log_history if "loss" in h]
    logs_on = [h for h in on.state.log_history if "loss" in h]
    assert [h["step"] for h in logs_on] == [2, 4]
    for a, b in zip(logs_off, logs_on, strict=True):
        assert {k: v for k, v in b.items() if not k.startswith("ge/")} == a
        assert set(METRIC_NAMES) <= set(b)
        assert b["ge/n_pairs"] == 8 if setting.get("gradient_accumulation_steps") else 4
        fracs = sum(b[f"ge/case{k}_frac"] for k in (1, 2, 3, 4))
        assert math.isclose(fracs, 1.0)
        assert b["ge/case4_frac"] == 0.0  # impossible for DPO's positive coefficients
        assert -1 <= b["ge/cosine"] <= 1
        assert b["ge/norm2_chosen"] > 0 and b["ge/norm2_rejected"] > 0
    pairs, probe = callback.pairs_frame(), callback.probe_frame()
    assert sorted(set(pairs["step"])) == [2, 4] and sorted(set(probe["step"])) == [2, 4]
    assert len(probe) == 2 * len(PROBE)
    # lr 1e-4: the first-order prediction of the probe changes is close to the realized one
    # (float32 log-probs near -20 resolve changes to about 1e-5)
    for side in ("chosen", "rejected"):
        pred, real = probe[f"pred_delta_{side}"], probe[f"real_delta_{side}"]
        assert np.allclose(pred, real, rtol=0.2, atol=max(0.02 * np.abs(real).max(), 2e-5))


def test_batch_probe_follows_the_steps_own_pairs(tmp_path):
    """``probe=k``: the first k pairs of each probed step's first micro-batch. Training stays
    bit-identical; their predicted changes, from the factors kept in the trainer's own backward
    divided by the loss coefficients, equal those of a separate pass (``in_backward=False``),
    so do their log-probs before the step (the training forward's against an eval pass), and
    the predictions are close to the realized changes."""
    runs = {}
    for mode in ("off", "backward", "separate"):
        torch.manual_seed(123)
        trainer = _trainer(tmp_path / mode, gradient_accumulation_steps=2, learning_rate=1e-5)
        callback = None
        if mode != "off":
            callback = attach_entanglement_metrics(trainer, probe=2, in_backward=mode == "backward")
        trainer.train()
        runs[mode] = (trainer, callback)
    p_off = _params(runs["off"][0])
    for mode in ("backward", "separate"):
        p_on = _params(runs[mode][0])
        assert all(torch.equal(p_off[k], p_on[k]) for k in p_off)
    kept, separate = (runs[m][1].probe_frame() for m in ("backward", "separate"))
    assert kept["step"].tolist() == [2, 2, 4, 4] and kept["pair"].tolist() == [0, 1, 0, 1]
    logs = [h for h in runs["backward"][0].state.log_history if "loss" in h]
    assert all(math.isfinite(h["ge/probe_pred_delta_chosen"]) for h in logs)
    for side in ("chosen", "rejected"):
        pred, real = kept[f"pred_delta_{side}"], kept[f"real_delta_{side}"]
        assert np.allclose(pred, separate[f"pred_delta_{side}"], rtol=1e-3, atol=1e-6)
        assert np.allclose(kept[f"logp_{side}"], separate[f"logp_{side}"], rtol=0, atol=1e-4)
        assert np.allclose(pred, real, rtol=0.2, atol=max(0.02 * np.abs(real).max(), 2e-5))


def test_a_measured_step_warns_nothing_from_the_package(tmp_path):
    """A user's training log gets no warning from ge_utils itself on a measured step with a
    probe of the step's own pairs (``index_reduce``, a beta API, used to warn). PyTorch warns
    once per process unless ``set_warn_always``: on here, so the test does not depend on
    the order the tests run in."""
    trainer = _trainer(tmp_path, max_steps=2, logging_steps=1)
    attach_entanglement_metrics(trainer, probe=2)
    package = str(Path(attach_entanglement_metrics.__code__.co_filename).parent)
    always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
    finally:
        torch.set_warn_always(always)
    ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if package in w.filename]
    assert not ours, ours


def test_consecutive_measured_steps_share_one_probe_pass(tmp_path, monkeypatch):
    """``every=1``: each step's probe forward and backward runs right after the previous
    update and is also that step's "after" (one probe pass a step, one plain forward at the
    end); the realized log-probs equal a recomputation at the parameters after each step, the
    predicted changes ``grad u . Delta theta`` one by autograd (the parameter copies reuse one
    memory); training stays bit-identical."""
    from transformers import TrainerCallback

    import ge_utils.trl_integration as integration
    from ge_utils.logprobs import concat_batches, sequence_logprobs

    calls = {"factors": 0, "forward": 0}
    for name, key in (("_logps_and_factors", "factors"), ("_eval_logps", "forward")):
        original = getattr(integration, name)

        def counted(*args, _original=original, _key=key, **kwargs):
            calls[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(integration, name, counted)

    class Snapshot(TrainerCallback):
        def __init__(self):
            self.params: list[dict[str, torch.Tensor]] = []
            self.buffers: list[set[int]] = []  # where the integration's parameter copies live
            self.integration = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.params.append({n: p.detach().clone() for n, p in model.named_parameters()})

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.params.append({n: p.detach().clone() for n, p in model.named_parameters()})
            if self.integration is not None:
                held = self.integration._theta_buffer.values()
                self.buffers.append({t.data_ptr() for t in held})

    runs = {}
    for on in (False, True):
        torch.manual_seed(123)
        trainer = _trainer(tmp_path / str(on), max_steps=3, gradient_checkpointing=False)
        snapshot = Snapshot()
        trainer.add_callback(snapshot)
        callback = attach_entanglement_metrics(trainer, probe=PROBE, every=1) if on else None
        snapshot.integration = callback
        trainer.train()
        runs[on] = (trainer, callback, snapshot)
    (off, _, _), (on, callback, snapshot) = runs[False], runs[True]
    snapshots = snapshot.params
    assert len(snapshot.buffers) == 3 and snapshot.buffers[0]
    assert snapshot.buffers[1] == snapshot.buffers[0] == snapshot.buffers[2]
    p_off, p_on = _params(off), _params(on)
    assert all(torch.equal(p_off[k], p_on[k]) for k in p_off)
    assert calls == {"factors": 3, "forward": 1}  # step 1's before, 2 chained, step 3's after
    probe = callback.probe_frame().sort_values(["step", "pair"])
    assert sorted(set(probe["step"])) == [1, 2, 3]
    batch = tokenize_probe(on, PROBE)
    joint = concat_batches(batch.chosen, batch.rejected)
    model = load_model("tiny-llama", device="cpu").model.eval()
    n = len(PROBE)
    for step, (start, params) in enumerate(itertools.pairwise(snapshots), start=1):
        model.load_state_dict(params)
        with torch.no_grad():
            u = sequence_logprobs(model, joint).numpy()
        rows = probe[probe["step"] == step]
        for side, part in (("chosen", u[:n]), ("rejected", u[n:])):
            after = (rows[f"logp_{side}"] + rows[f"real_delta_{side}"]).to_numpy()
            np.testing.assert_allclose(after, part, rtol=0, atol=1e-4)
            if step < 3:  # the next step starts where this one ended
                nxt = probe[probe["step"] == step + 1][f"logp_{side}"].to_numpy()
                np.testing.assert_allclose(nxt, after, rtol=0, atol=1e-4)
        model.load_state_dict(start)  # grad u_i at the step's start, dotted with its update
        names = [k for k, p in model.named_parameters() if p.requires_grad]
        trainable = [p for p in model.parameters() if p.requires_grad]
        u0 = sequence_logprobs(model, joint)
        pred = []
        for i in range(len(u0)):
            grads = torch.autograd.grad(u0[i], trainable, retain_graph=True, allow_unused=True)
            pred.append(
                sum(
                    float((g * (params[k] - start[k])).sum())
                    for k, g in zip(names, grads, strict=True)
                    if g is not None
                )
            )
        for side, part in (("chosen", pred[:n]), ("rejected", pred[n:])):
            np.testing.assert_allclose(
                rows[f"pred_delta_{side}"].to_numpy(), part, rtol=1e-3, atol=1e-7
            )


def test_probe_every_follows_the_probe_on_its_own_steps(tmp_path):
    """``probe_every=2`` with ``every=1``: the batch statistics at every step, the probe at
    steps 2 and 4 only (each with its own passes), and its metrics logged at those steps."""
    trainer = _trainer(tmp_path, max_steps=4, logging_steps=1, gradient_checkpointing=False)
    callback = attach_entanglement_metrics(trainer, probe=PROBE, every=1, probe_every=2)
    trainer.train()
    assert sorted(set(callback.pairs_frame()["step"])) == [1, 2, 3, 4]
    assert sorted(set(callback.probe_frame()["step"])) == [2, 4]
    logs = {h["step"]: h for h in trainer.state.log_history if "ge/inner" in h}
    assert sorted(logs) == [1, 2, 3, 4]
    assert [s for s, h in logs.items() if "ge/probe_sign_agree" in h] == [2, 4]


def test_seconds_count_the_statistics_once(tmp_path, monkeypatch):
    """``ge/seconds`` holds the time of the step's statistics once: reading the last
    micro-batch's statistics (made 0.5 s slower here) was counted twice."""
    pause = 0.5
    stats = _StepRecorder._stats

    def slow(self, micro):
        time.sleep(pause)
        return stats(self, micro)

    monkeypatch.setattr(_StepRecorder, "_stats", slow)
    trainer = _trainer(tmp_path, max_steps=1, logging_steps=1, gradient_checkpointing=False)
    attach_entanglement_metrics(trainer)
    trainer.train()
    seconds = [h["ge/seconds"] for h in trainer.state.log_history if "ge/seconds" in h]
    assert len(seconds) == 1 and pause <= seconds[0] < 2 * pause


def test_statistics_match_trl_and_brute_force(tmp_path):
    """Per-pair log-probs equal TRL's logged ``logps/*`` (same tokens, same parameters); at step
    1 the policy is its reference, so DPO's coefficients are beta / 2; the statistics of a
    step's batch are those of the fast method on that batch."""
    trainer = _trainer(tmp_path, logging_steps=1, max_steps=2, beta=0.2)
    callback = attach_entanglement_metrics(trainer)
    ref_calls = []
    trainer.ref_model.register_forward_hook(lambda *args: ref_calls.append(1))
    batches = []
    original = trainer.compute_loss

    def spy(model, inputs, *args, **kwargs):
        if torch.is_grad_enabled():
            batches.append((inputs, {n: p.detach().clone() for n, p in model.named_parameters()}))
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = spy
    trainer.train()
    pairs = callback.pairs_frame()
    logs = [h for h in trainer.state.log_history if "ge/inner" in h]
    assert len(logs) == 2 and not any(k.startswith("ge/probe") for k in logs[0])
    for log in logs:
        rows = pairs[pairs["step"] == log["step"]]
        assert math.isclose(rows["logp_chosen"].mean(), log["logps/chosen"], rel_tol=1e-5)
        assert math.isclose(rows["logp_rejected"].mean(), log["logps/rejected"], rel_tol=1e-5)
    first = pairs[pairs["step"] == 1]
    assert np.allclose(first["d_w"], 0.1) and np.allclose(first["d_l"], 0.1)
    # the reference log-probs are those of the trainer's own reference forward: one a step
    assert len(ref_calls) == 2
    # step 2's batch, recomputed directly at the parameters the step started from
    from ge_utils.trl_integration import split_trl_batch

    inputs, params = batches[1]
    model = load_model("tiny-llama", device="cpu").model
    model.load_state_dict(params)
    chosen, rejected = split_trl_batch(inputs)
    stats = fast_gradient_stats(model, chosen, rejected)
    rows = pairs[pairs["step"] == 2]
    # recorded in TRL's float32 backward, whose output gradients carry the loss coefficients
    # (divided out afterwards): rounding at 1e-4, not 1e-6
    for key, col in (("inner", "grad_inner"), ("norm2_chosen", "grad_norm2_chosen")):
        assert np.allclose(rows[col], stats[key].numpy(), rtol=1e-4)


@pytest.mark.parametrize("lora", [False, True], ids=["full-tied-head", "lora"])
def test_in_backward_statistics_equal_a_separate_pass(tmp_path, lora):
    """Statistics recorded in TRL's own backward (the fused head's share included) equal those
    of a separate fast pass, pair by pair; training is the same either way."""
    frames = {}
    for in_backward in (False, True):
        torch.manual_seed(123)
        trainer = _trainer(
            tmp_path / str(in_backward),
            lora=lora,
            ref=not lora,
            max_steps=2,
            logging_steps=1,
            gradient_accumulation_steps=2,
        )
        callback = attach_entanglement_metrics(trainer, in_backward=in_backward)
        assert callback.in_backward == in_backward
        recorded = []
        original = callback._batch_records

        def spy(micro, step, original=original, recorded=recorded):
            recorded.append(micro.stats is not None)
            return original(micro, step)

        callback._batch_records = spy
        trainer.train()
        assert recorded == [in_backward] * 4  # 2 steps x 2 micro-batches, none fell back
        frames[in_backward] = callback.pairs_frame(), _params(trainer)
    (sep, p_sep), (inb, p_inb) = frames[False], frames[True]
    assert all(torch.equal(p_sep[k], p_inb[k]) for k in p_sep)
    assert len(sep) == len(inb) == 16
    for col in ("grad_inner", "grad_norm2_chosen", "grad_norm2_rejected"):
        assert np.allclose(inb[col], sep[col], rtol=1e-3, atol=1e-4 * np.abs(sep[col]).max())
    for col in ("logp_chosen", "logp_rejected", "d_w", "d_l"):
        assert np.allclose(inb[col], sep[col], rtol=1e-5)
    assert (inb["case"] == sep["case"]).all()


def test_a_loss_not_of_the_summed_logps_gets_a_separate_pass(tmp_path):
    """Output gradients that weight a sequence's tokens unequally (here a hook on the backbone
    output that doubles its gradient at odd positions) fail the in-backward check: the micro-batch's
    statistics come from a separate pass instead."""
    trainer = _trainer(tmp_path, max_steps=1, logging_steps=1, gradient_checkpointing=False)
    callback = attach_entanglement_metrics(trainer)

    def reweight(module, args, output):
        h = output.last_hidden_state
        if h.requires_grad:
            w = 1.0 + (torch.arange(h.shape[1]) % 2).to(h.dtype)[:, None]
            h.register_hook(lambda grad: grad * w)  # runs before the integration's own hook

    trainer.model.model.register_forward_hook(reweight)
    recorded = []
    original = callback._batch_records

    def spy(micro, step):
        recorded.append(micro.stats is not None)
        return original(micro, step)

    callback._batch_records = spy
    trainer.train()
    assert recorded == [False] and len(callback.pairs_frame()) == 4


def _family_trainer(tmp_path, model_type: str, **settings) -> DPOTrainer:
    """A one-step DPOTrainer on a tiny model of another family (and its reference), with the
    tiny Llama's tokenizer; ``settings`` go to the model's config."""
    warnings.filterwarnings("ignore")
    tok = load_model("tiny-llama", device="cpu").tokenizer
    model, ref = (hf_model(model_type, vocab_size=len(tok), **settings) for _ in range(2))
    cfg = dict(per_device_train_batch_size=4, max_steps=1, logging_steps=1, learning_rate=1e-4)
    cfg |= dict(report_to=[], use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True)
    return DPOTrainer(
        model=model,
        ref_model=ref,
        args=DPOConfig(output_dir=str(tmp_path), seed=0, **cfg),
        train_dataset=_data(),
        processing_class=tok,
    )


NO_AUX = {"router_aux_loss_coef": 0.0}  # no load-balancing loss in TRL's (aux_loss_enabled)


def _attention_only(name: str, p: torch.nn.Parameter) -> bool:
    return "self_attn" in name


@pytest.mark.parametrize(
    ("model_type", "in_backward", "settings", "params"),
    [
        ("qwen3", True, {}, _attention_only),
        ("gemma2", False, {}, None),
        ("opt", True, {"dropout": 0.0}, None),
        ("mixtral", True, NO_AUX, None),
        ("mixtral", False, {}, None),
        ("gpt_oss", True, {"num_local_experts": 4, "num_experts_per_tok": 2, **NO_AUX}, None),
    ],
    ids=["qwen3-attention-only", "gemma2", "opt", "mixtral", "mixtral-load-balancing", "gpt-oss"],
)
def test_other_families_get_the_statistics_of_the_fast_method(
    tmp_path, model_type, in_backward, settings, params
):
    """Qwen3 (per-head norms; recorded in TRL's backward), Gemma 2 (soft-capped logits, which
    the fused head's share does not cover: a separate pass), OPT (MLP rows flattened over the
    batch, recorded in TRL's backward, where the recorder knows the batch only by its pairs;
    its learned positional embedding, called with keywords) and Mixtral (routers and experts,
    rows flattened over the batch; with TRL's load-balancing loss on, which adds its own
    gradient to the backward, a separate pass) and GPT-OSS (routers and experts with biases,
    attention sinks; in TRL's backward), on the tiny Llama's tokenizer; for Qwen3 over
    the attention's parameters only (``params``): a step's per-pair statistics and log-probs
    are those of the fast method on its batch."""
    trainer = _family_trainer(tmp_path, model_type, **settings)
    callback = attach_entanglement_metrics(trainer, params=params)
    start = hf_model(model_type, vocab_size=trainer.model.config.vocab_size, **settings)
    inputs, recorded = [], []
    original_loss, original_records = trainer.compute_loss, callback._batch_records

    def spy_loss(model, batch, *args, **kwargs):
        if torch.is_grad_enabled():
            inputs.append(batch)
        return original_loss(model, batch, *args, **kwargs)

    def spy_records(micro, step):
        recorded.append(micro.stats is not None)
        return original_records(micro, step)

    trainer.compute_loss, callback._batch_records = spy_loss, spy_records
    trainer.train()
    assert recorded == [in_backward]
    from ge_utils.trl_integration import split_trl_batch

    stats = fast_gradient_stats(start, *split_trl_batch(inputs[0]), params=params)
    pairs = callback.pairs_frame()
    for key, col in (("inner", "grad_inner"), ("norm2_chosen", "grad_norm2_chosen")):
        assert np.allclose(pairs[col], stats[key].numpy(), rtol=1e-4)
    assert np.allclose(pairs["logp_chosen"], stats["logp_chosen"].numpy(), atol=1e-4)


def test_models_the_metrics_cannot_measure_are_refused_before_training(tmp_path):
    """A mixture of experts with a router of a kind without a rule (one whose logits are not
    ``x W^T``, with a tuple output) is refused when the callback is built (not in the first measured
    step), with the way out. OPT's functional dropout (from the config, which TRL's
    ``disable_dropout`` does not reach) makes the training forward random: a warning says that
    training runs with dropout, and a batch probe, which cannot use such a forward, is refused;
    without dropout, neither. Frozen parameters are not a parameter set of the step."""
    moe = _family_trainer(tmp_path / "moe", "mixtral")
    use_rescaled_routers(moe.model)
    with pytest.raises(TypeError, match=r"RescaledLogitsRouter.*params="):
        attach_entanglement_metrics(moe)
    trainer = _family_trainer(tmp_path, "opt")
    with pytest.warns(UserWarning, match="did not turn off all dropout"):
        attach_entanglement_metrics(trainer).detach()
    with pytest.raises(ValueError, match="dropout that it does not reach"):
        attach_entanglement_metrics(trainer, probe=2)
    still = _family_trainer(tmp_path, "opt", dropout=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attach_entanglement_metrics(still, probe=2).detach()
    assert not [w for w in caught if "dropout" in str(w.message)]
    for p in still.model.model.decoder.layers[0].parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"frozen: model\.decoder\.layers\.0"):
        attach_entanglement_metrics(still, params=lambda name, p: "layers.0" in name)


def test_precomputed_reference_logps(tmp_path):
    """``precompute_ref_log_probs`` without a reference model: the batch's columns are used."""
    trainer = _trainer(tmp_path, ref=False, precompute_ref_log_probs=True, max_steps=2)
    callback = attach_entanglement_metrics(trainer, every=1, max_pairs=3)
    trainer.train()
    first = callback.pairs_frame().query("step == 1")
    assert len(first) == 3 and np.allclose(first["d_w"], 0.05, rtol=1e-4)
    assert [h["ge/n_pairs"] for h in trainer.state.log_history if "ge/n_pairs" in h] == [3]


def test_directional_derivative_forward_and_reverse_mode(monkeypatch):
    """``g . v`` by forward-mode AD equals the per-sequence reverse-mode fallback and a
    central finite difference; the model is left untouched."""
    lm = load_model("tiny-llama", device="cpu")
    model = lm.model.double()
    from ge_utils.logprobs import tokenize

    batch = tokenize(lm.tokenizer, [p.prompt for p in PROBE], [p.chosen for p in PROBE])
    at = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    v = {n: 1e-3 * torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in at.items()}
    u, fwd = directional_logps(model, batch, at, v)

    def broken_jvp(*args, **kwargs):
        raise NotImplementedError("no forward AD here")

    with monkeypatch.context() as m:
        m.setattr(torch.func, "jvp", broken_jvp)
        u2, rev = directional_logps(model, batch, at, v)
    assert torch.allclose(u, u2) and torch.allclose(fwd, rev, rtol=1e-6), fwd - rev
    eps = 1e-2  # Llama's rotary tables are float32: a smaller step meets their rounding
    plus = directional_logps(model, batch, {n: at[n] + eps * v[n] for n in at}, v)[0]
    minus = directional_logps(model, batch, {n: at[n] - eps * v[n] for n in at}, v)[0]
    assert torch.allclose(fwd, (plus - minus) / (2 * eps), rtol=1e-3)
    assert all(torch.equal(p, at[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("lora", [False, True], ids=["full-tied-head", "lora"])
def test_probe_prediction_from_factors_equals_forward_mode(lora):
    """The probe's ``g . Delta theta`` from the recorder's kept factors (recorded before the
    step, contracted with the update after it) equals the forward-mode pass at the same
    parameters, sequence by sequence, and so do the log-probs; the model is left untouched."""
    from ge_utils.logprobs import concat_batches, tokenize
    from ge_utils.trl_integration import _logps_and_factors, _Update

    lm = load_model("tiny-llama", device="cpu", lora_rank=4 if lora else None)
    model = lm.model.double()
    chosen = tokenize(lm.tokenizer, [p.prompt for p in PROBE], [p.chosen for p in PROBE])
    rejected = tokenize(lm.tokenizer, [p.prompt for p in PROBE], [p.rejected for p in PROBE])
    batch = concat_batches(chosen, rejected)
    at = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(0)
    step = {n: 1e-3 * torch.randn(a.shape, generator=gen, dtype=a.dtype) for n, a in at.items()}
    moved = {n: at[n] + step[n] for n in at}
    u, rec = _logps_and_factors(model, batch)
    pred = rec.directional(_Update(moved, {n: a.clone() for n, a in at.items()}))
    u_fwd, pred_fwd = directional_logps(model, batch, at, {n: moved[n] - at[n] for n in at})
    torch.testing.assert_close(u.double(), u_fwd.double(), rtol=1e-9, atol=1e-9)
    # Llama's RMSNorm and rotary tables compute in float32 even in a float64 model: 1e-5
    torch.testing.assert_close(pred, pred_fwd.double(), rtol=1e-5, atol=1e-9)
    assert all(torch.equal(p, at[n]) for n, p in model.named_parameters() if n in at)
    assert all(p.grad is None for p in model.parameters())


def test_clear_errors(tmp_path):
    trainer = _trainer(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="empty chosen response"):
        attach_entanglement_metrics(
            trainer, probe=[{"prompt": "a", "chosen": " ", "rejected": "b"}]
        )
    with pytest.raises(ValueError, match="no 'rejected' field"):
        attach_entanglement_metrics(trainer, probe=[{"prompt": "a", "chosen": "b"}])
    with pytest.raises(ValueError, match="probe set is empty"):
        attach_entanglement_metrics(trainer, probe=[])
    probe = tokenize_probe(trainer, PROBE)
    bad = ProbeBatch(probe.chosen, probe.rejected.select([0, 1, 2, 3]))
    bad.rejected.response_mask[1] = False
    with pytest.raises(ValueError, match="rejected rows \\[1\\] have an empty response"):
        attach_entanglement_metrics(trainer, probe=bad)
    with pytest.raises(ValueError, match="every"):
        attach_entanglement_metrics(trainer, every=0)
    with pytest.raises(ValueError, match="probe_every must be a positive integer"):
        attach_entanglement_metrics(trainer, probe=PROBE, probe_every=True)
    with pytest.raises(ValueError, match="probe_every needs a probe"):
        attach_entanglement_metrics(trainer, probe_every=2)
    with pytest.raises(ValueError, match="follows k >= 1 pairs"):
        attach_entanglement_metrics(trainer, probe=0)
    for bad in (True, 2.5, "pairs"):
        with pytest.raises(TypeError, match="probe must be pairs"):
            attach_entanglement_metrics(trainer, probe=bad)
    with pytest.raises(ValueError, match="disable_dropout=True"):
        attach_entanglement_metrics(_trainer(tmp_path / "dropout", disable_dropout=False), probe=2)
    with pytest.raises(TypeError, match="unsupported trainer"):
        attach_entanglement_metrics(object())
    with pytest.raises(TypeError, match="MarginLoss"):
        attach_entanglement_metrics(trainer, loss="dpo")
    callback = attach_entanglement_metrics(trainer, probe=probe)
    with pytest.raises(RuntimeError, match="already attached"):
        attach_entanglement_metrics(trainer)
    callback.detach()
    attach_entanglement_metrics(trainer, loss=get_loss("dpo", beta=0.1)).detach()
    hinge = _trainer(tmp_path, max_steps=1, loss_type=["hinge"])
    with pytest.raises(NotImplementedError, match="pass loss="):
        attach_entanglement_metrics(hinge)
    wpo = _trainer(tmp_path, max_steps=1, use_weighting=True)
    for loss in (None, get_loss("dpo", beta=0.1)):
        with pytest.raises(NotImplementedError, match="WPO"):
            attach_entanglement_metrics(wpo, loss=loss)


def test_loss_weight_multiplies_the_coefficients(tmp_path):
    """TRL's ``loss_weights=[w]`` makes the loss w times DPO's: at step 1 (the policy is its
    reference) the coefficients are w * beta / 2, and the statistics of the gradients of the
    log-probs, which the recorder divides by the trainer's own coefficients, do not change."""
    runs = {}
    for w in (1.0, 3.0):
        trainer = _trainer(tmp_path / str(w), max_steps=1, logging_steps=1, loss_weights=[w])
        callback = attach_entanglement_metrics(trainer)
        trainer.train()
        runs[w] = callback.pairs_frame()
    assert np.allclose(runs[1.0]["d_w"], 0.05) and np.allclose(runs[3.0]["d_l"], 0.15)
    for col in ("grad_inner", "grad_norm2_chosen", "case"):
        assert np.allclose(runs[1.0][col], runs[3.0][col], rtol=1e-4), col


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SCRIPT = str(HERE / "trl_ddp_run.py")


def _two_processes(accelerate: str, out: Path, *args: str) -> None:
    """``tests/trl_ddp_run.py out *args`` on two CPU processes (DDP over gloo)."""
    # accelerate 1.15: --cpu with several processes starts only one; --multi_gpu on a machine
    # without GPUs starts DDP over CPU processes (gloo)
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(_free_port())]
    done = subprocess.run([*launch, SCRIPT, str(out), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_agree_with_one(tmp_path):
    """The same global batch (4 pairs a step) on one process and on two (2 pairs each, DDP over
    gloo): the aggregated metrics and every pair's statistics agree to float tolerance (the two
    runs pad and reduce differently, so bit-equality is not expected)."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("the accelerate command is not installed")
    load_model("tiny-llama", device="cpu")  # build the cache once, not in both processes
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run(
        [sys.executable, SCRIPT, str(one), "--per-device", "4"], check=True, capture_output=True
    )
    _two_processes(accelerate, two, "--per-device", "2")
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["world"], b["world"]) == (1, 2)
    assert len(a["logs"]) == len(b["logs"]) == 3
    for la, lb in zip(a["logs"], b["logs"], strict=True):
        assert lb["ge/n_pairs"] == la["ge/n_pairs"] == 4
        for key in la:
            if key.startswith("ge/") and key != "ge/seconds":
                assert math.isclose(la[key], lb[key], rel_tol=1e-4, abs_tol=1e-4), key
    for frame in ("pairs", "probe"):
        for key, xs in a[frame].items():
            x, y = np.asarray(xs, dtype=float), np.asarray(b[frame][key], dtype=float)
            assert np.allclose(x, y, rtol=1e-4, atol=1e-4), (frame, key)
    assert a["probe"]["pair"] == b["probe"]["pair"] == [0, 1, 2, 3, 4] * 3


def test_batch_probe_on_two_processes(tmp_path):
    """``probe=k`` under DDP: each process follows its own first k pairs, and the gathered
    frame has every process's, numbered by rank (rank * k + position)."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("the accelerate command is not installed")
    load_model("tiny-llama", device="cpu")
    out = tmp_path / "two.json"
    _two_processes(accelerate, out, "--per-device", "2", "--batch-probe", "1")
    result = json.loads(out.read_text())
    assert result["world"] == 2
    assert result["probe"]["pair"] == [0, 1] * 3 and result["probe"]["step"] == [1, 1, 2, 2, 3, 3]
    assert all(math.isfinite(x) for x in result["probe"]["pred_delta_chosen"])


def test_layers_reduced_together_as_on_a_gpu(tmp_path, monkeypatch):
    """The recorder's default off the CPU (``DEVICE_GROUP`` layers reduced together) forced
    here: the statistics recorded in TRL's backward (the fused head's share included, with
    gradient accumulation) and the training loop's equal those of the CPU default, and training
    is unchanged."""
    import ge_utils.stats.recorder as recorder
    from ge_utils.training import TrainConfig, preference_optimization

    sizes: dict[bool, set[int]] = {False: set(), True: set()}
    reduce = recorder.GhostRecorder._reduce
    runs = {}
    for forced in (False, True):

        def spy(self, uses, forced=forced):
            sizes[forced].add(len(uses))
            return reduce(self, uses)

        monkeypatch.setattr(recorder.GhostRecorder, "_reduce", spy)
        if forced:
            monkeypatch.setattr(recorder, "default_group", lambda device: recorder.DEVICE_GROUP)
        torch.manual_seed(123)
        trainer = _trainer(
            tmp_path / str(forced), max_steps=2, logging_steps=1, gradient_accumulation_steps=2
        )
        callback = attach_entanglement_metrics(trainer)
        trainer.train()
        lm = load_model("tiny-llama", device="cpu")
        cfg = TrainConfig(
            steps=2, batch_size=2, lr=1e-4, eval_every=10**6, train_stats=True, progress=False
        )
        ours = preference_optimization(lm.model, lm.tokenizer, TRAIN, TRAIN[:1], cfg).pairs
        runs[forced] = callback.pairs_frame(), _params(trainer), ours[ours["split"] == "train"]
    (trl_1, p_1, ours_1), (trl_k, p_k, ours_k) = runs[False], runs[True]
    assert sizes[False] == {1} and max(sizes[True]) > 1  # the layers were reduced together
    assert all(torch.equal(p_1[k], p_k[k]) for k in p_1)
    assert len(trl_1) == len(trl_k) == 16 and len(ours_1) == len(ours_k) > 0
    for one, together in ((trl_1, trl_k), (ours_1, ours_k)):
        for col in ("grad_inner", "grad_norm2_chosen", "grad_norm2_rejected"):
            np.testing.assert_allclose(together[col], one[col], rtol=1e-5)
