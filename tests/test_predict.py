"""Displacement scores against brute force, the skill metrics against scikit-learn and scipy,
the varied pair set, and the realized full-batch change against a hand-made step."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score
from transformers import LogitsProcessorList

from ge_utils.data import load_pairs
from ge_utils.gradients import pair_logps
from ge_utils.logprobs import build_batch, response_ids, sequence_logprobs, tokenize
from ge_utils.losses import get_loss
from ge_utils.models import load_model
from ge_utils.predict import (
    SCORES,
    PredictionSetup,
    auroc,
    auroc_difference,
    auroc_estimate,
    ches_scores,
    displacement_score,
    edit_distance,
    families_of,
    first_step_changes,
    first_step_predictions,
    realized_changes,
    score_pairs,
    skill_table,
    spearman_estimate,
)
from ge_utils.training import TrainConfig
from ge_utils.varied_data import (
    TEMPLATED,
    _DrawOnCpu,
    as_preference_pairs,
    sampled_pairs,
    stated_label,
    templated_pairs,
    write_jsonl,
)

PAIRS = [
    ([5, 6, 7], [8, 9], [10, 11, 12]),
    ([5, 6], [8, 9, 10, 11], [8, 9, 10, 12]),
    ([7], [9], [9, 10, 11, 12, 13]),
]


def brute_force(model, prompt, response):
    """S (sum of the final hidden states at positions len(prompt)-1 .. len(seq)-2, read from
    ``output_hidden_states[-1]`` of the unpadded sequence), the last position's state, and |y|."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].double()
    return h[len(prompt) - 1 : ids.shape[1] - 1].sum(0), h[-1], len(response)


@pytest.mark.parametrize("side", ["left", "right"])
def test_ches_equals_brute_force_from_output_hidden_states(tiny_model, side):
    chosen = build_batch([(p, w) for p, w, _ in PAIRS], pad_id=0, padding_side=side)
    rejected = build_batch([(p, r) for p, _, r in PAIRS], pad_id=0, padding_side=side)
    got = ches_scores(tiny_model, chosen, rejected)
    for i, (p, w, r) in enumerate(PAIRS):
        s_w, last_w, n_w = brute_force(tiny_model, p, w)
        s_l, last_l, n_l = brute_force(tiny_model, p, r)
        expected = {
            "ches": s_w @ s_l - s_w @ s_w,
            "ln_ches": s_w @ s_l / (n_w * n_l) - s_w @ s_w / n_w**2,
            "last_hidden_inner": last_w @ last_l,
        }
        for key, value in expected.items():
            torch.testing.assert_close(got[key][i], value, rtol=1e-9, atol=1e-9)


def test_ches_rejects_mismatched_batches(tiny_model):
    chosen = build_batch([(p, w) for p, w, _ in PAIRS], pad_id=0)
    with pytest.raises(ValueError, match="3 chosen but 2 rejected"):
        ches_scores(tiny_model, chosen, chosen.select([0, 1]))


def test_ches_refuses_non_finite_hidden_states(tiny_model):
    """A NaN weight makes every hidden state NaN: an error, not NaN scores."""
    chosen = build_batch([(p, w) for p, w, _ in PAIRS], pad_id=0)
    weight = tiny_model.get_input_embeddings().weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[:] = float("nan")
    try:
        with pytest.raises(ValueError, match=r"hidden states of .* are not finite"):
            ches_scores(tiny_model, chosen, chosen)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def levenshtein(a, b):
    """Brute force: the shortest edit script by recursion over both ends."""
    if not a or not b:
        return len(a) + len(b)
    return min(
        levenshtein(a[1:], b) + 1,
        levenshtein(a, b[1:]) + 1,
        levenshtein(a[1:], b[1:]) + (a[0] != b[0]),
    )


def test_edit_distance_equals_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = rng.integers(0, 3, rng.integers(0, 6)).tolist()
        b = rng.integers(0, 3, rng.integers(0, 6)).tolist()
        assert edit_distance(a, b) == levenshtein(a, b)
    assert edit_distance([1, 2, 3], [1, 2, 3]) == 0


def test_auroc_equals_sklearn_with_ties():
    rng = np.random.default_rng(1)
    for n in (5, 20, 101):
        y = rng.random(n) < 0.4
        y[:2] = [True, False]
        s = rng.integers(0, 4, n).astype(float)  # many ties
        assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        s = rng.normal(size=n)
        assert auroc(y.astype(int), s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@pytest.mark.parametrize(
    ("y", "s", "message"),
    [
        ([True, True], [0.1, 0.2], "both classes"),
        ([True, False], [0.1], "one length"),
        ([2, 0], [0.1, 0.2], "0/1"),
        ([True, False], [0.1, math.nan], "finite"),
    ],
)
def test_auroc_bad_input(y, s, message):
    with pytest.raises(ValueError, match=message):
        auroc(y, s)


def test_estimates_and_skill_table():
    rng = np.random.default_rng(2)
    change = rng.normal(size=40)
    table = pd.DataFrame(
        {
            "ches": -change + 0.1 * rng.normal(size=40),  # a strong predictor of the fall
            "pred_delta_chosen": rng.normal(size=40),  # noise
        }
    )
    fell = change < 0
    strong = auroc_estimate(fell, displacement_score(table, "ches"), n_resamples=300)
    assert strong.effect == pytest.approx(roc_auc_score(fell, table["ches"]))
    assert strong.low > 0.8 and strong.low <= strong.effect <= strong.high
    rho = spearman_estimate(table["ches"].to_numpy(), change, n_resamples=300)
    assert rho.effect == pytest.approx(stats.spearmanr(table["ches"], -change).statistic)
    diff = auroc_difference(
        fell, table["ches"].to_numpy(), -table["pred_delta_chosen"].to_numpy(), n_resamples=300
    )
    assert diff.low > 0
    same = auroc_difference(fell, table["ches"].to_numpy(), table["ches"].to_numpy(), 100)
    assert (same.effect, same.low, same.high) == (0.0, 0.0, 0.0)
    skill = skill_table(table, change, n_resamples=200).set_index("score")
    assert list(skill.index) == ["pred_delta_chosen", "ches"]  # in the order of SCORES
    assert skill.loc["ches", "n_fell"] == int(fell.sum()) and skill.loc["ches", "n"] == 40
    undefined = auroc_estimate(np.array([True] + [False] * 9), np.arange(10.0))
    assert math.isnan(undefined.effect) and undefined.low == -math.inf


def test_scores_and_families_are_validated():
    assert families_of("all") == ("gradient", "ches", "baselines")
    with pytest.raises(ValueError, match="unknown scores 'grad'"):
        families_of("grad")
    with pytest.raises(ValueError, match="unknown score 'x'"):
        displacement_score(pd.DataFrame({"x": [1.0]}), "x")
    assert {s.family for s in SCORES.values()} == {"gradient", "ches", "baselines", "batch"}


def test_score_pairs_columns_and_gradient_scores(tiny_model, tokenizer):
    prompts = ["The film was a delight.", "The service was slow."]
    chosen = ["Positive sentiment.", "Negative sentiment based on my judgement."]
    rejected = ["Negative sentiment.", "Positive."]
    loss = get_loss("dpo", beta=0.1)
    table = score_pairs(tiny_model, tokenizer, prompts, chosen, rejected, loss, eta=0.5)
    for name, score in SCORES.items():
        if score.family != "batch":  # needs the set and the optimizer: first_step_predictions
            assert np.isfinite(table[name]).all(), name
    expected = table["pred_delta_chosen"] / table["grad_norm2_chosen"]
    np.testing.assert_allclose(table["pred_delta_chosen_over_norm2"], expected)
    distances = [
        edit_distance(response_ids(tokenizer, a), response_ids(tokenizer, b))
        for a, b in zip(chosen, rejected, strict=True)
    ]
    assert table["edit_distance"].tolist() == distances == [1, 6]
    only = score_pairs(tiny_model, tokenizer, prompts, chosen, rejected, loss, scores="ches")
    assert list(only.columns) == ["pair", "ches", "ln_ches"]
    np.testing.assert_allclose(only["ches"], table["ches"])


def test_templated_pairs_cycle_families_and_load_as_jsonl(tmp_path):
    pairs = templated_pairs(25, seed=3)
    assert [p.family for p in pairs[: len(TEMPLATED)]] == list(TEMPLATED)
    assert all(p.chosen != p.rejected for p in pairs)
    assert templated_pairs(25, seed=3) == pairs
    for p in pairs:  # the chosen response states the statement's true sentiment
        assert stated_label(p.chosen) in ("Positive", "Negative")
    path = tmp_path / "varied.jsonl"
    write_jsonl(path, pairs)
    loaded = load_pairs(path)
    assert [(p.prompt, p.chosen, p.rejected) for p in loaded] == [
        (p.prompt, p.chosen, p.rejected) for p in as_preference_pairs(pairs)
    ]
    with pytest.raises(ValueError, match="n must be in"):
        templated_pairs(10_000)
    weighted = templated_pairs(8, seed=3, families=["paper", "paper", "suffix"])
    assert [p.family for p in weighted] == ["paper", "paper", "suffix"] * 2 + ["paper"] * 2
    assert weighted[0].chosen.endswith(" sentiment based on my judgement.")
    assert weighted[0].rejected.endswith(" sentiment based on my judgement.")
    for bad in ([], ["sampled"], ["nope"]):
        with pytest.raises(ValueError, match="families must name templated families"):
            templated_pairs(4, families=bad)


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("Positive.", "Positive"),
        ("negative sentiment", "Negative"),
        ("Positive, not negative", None),
        ("Positively great", None),
        ("I cannot tell", None),
    ],
)
def test_stated_label(text, label):
    assert stated_label(text) == label


def test_sampled_pairs_follow_the_labelling_rule(tiny_model, tokenizer):
    torch.manual_seed(0)
    got = sampled_pairs(tiny_model, tokenizer, n_prompts=6, seed=1, max_new_tokens=4)
    assert got.kept + got.both_right + got.both_wrong_or_none + got.identical == got.prompts == 6
    assert got.kept == len(got.pairs)
    for p in got.pairs:
        assert stated_label(p.chosen) is not None and p.family == "sampled"
        assert stated_label(p.rejected) != stated_label(p.chosen)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_tokens_drawn_on_the_cpu_are_those_of_sampling(tiny_model, tokenizer, temperature):
    """The CPU draw that lets a GPU sample what the CPU samples: on the CPU, greedy decoding
    through it gives, token for token, ``generate(do_sample=True, top_k=0)`` from the same seed
    (and leaves the generator where sampling leaves it)."""
    ids = torch.tensor([tokenizer("the film was")["input_ids"]] * 3)
    runs = []
    for sampling in (True, False):
        torch.manual_seed(5)
        options = (
            {"do_sample": True, "temperature": temperature, "top_k": 0}
            if sampling
            else {
                "do_sample": False,
                "logits_processor": LogitsProcessorList([_DrawOnCpu(temperature)]),
            }
        )
        with torch.no_grad():
            out = tiny_model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, pad_token_id=0,
                **options,
            )  # fmt: skip
        runs.append((out, torch.rand(1)))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert runs[0][0].shape[1] > ids.shape[1]
    with pytest.raises(ValueError, match="temperature"):
        _DrawOnCpu(0.0)


def test_realized_change_is_one_full_batch_step():
    """Step 1 of :func:`realized_changes` with SGD equals one hand-made SGD step on the mean DPO
    loss of every pair (micro-batches of 2 accumulated)."""
    pairs = as_preference_pairs(templated_pairs(5, seed=0))
    setup = PredictionSetup("tiny-llama", beta=0.1, batch_size=2)
    out = realized_changes(setup, pairs, "sgd", lr=0.5, steps=2, cache=False)
    assert sorted(out["step"].unique()) == [1, 2] and len(out) == 10

    loaded = load_model("tiny-llama")
    model, tok = loaded.model, loaded.tokenizer
    c = tokenize(tok, [p.prompt for p in pairs], [p.chosen for p in pairs])
    r = tokenize(tok, [p.prompt for p in pairs], [p.rejected for p in pairs])
    with torch.no_grad():
        ref_w, ref_l = sequence_logprobs(model, c), sequence_logprobs(model, r)
    model.train()
    u_w, u_l = sequence_logprobs(model, c), sequence_logprobs(model, r)
    loss = get_loss("dpo", beta=0.1).loss(pair_logps(u_w, u_l, c, r, (ref_w, ref_l))).mean()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
        model.eval()
        new_w = sequence_logprobs(model, c)
    first = out[out["step"] == 1].sort_values("pair")
    np.testing.assert_allclose(first["delta_chosen"], (new_w - ref_w).double(), atol=2e-5)


def test_sft_start_is_the_same_for_scores_and_training():
    """With ``sft_steps`` every caller fine-tunes the same model the same way (seeded), so the
    scores and each training run start from identical weights; without it the model is as
    loaded."""
    from ge_utils.predict import _load

    pairs = as_preference_pairs(templated_pairs(4, seed=0))
    setup = PredictionSetup("tiny-llama", batch_size=2, sft_steps=2, sft_lr=1e-3)
    a, b = _load(setup, pairs).model, _load(setup, pairs).model
    plain = _load(PredictionSetup("tiny-llama"), pairs).model
    same = [torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True)]
    moved = [torch.equal(x, y) for x, y in zip(a.parameters(), plain.parameters(), strict=True)]
    assert all(same) and not all(moved)


def test_first_step_prediction_is_the_batch_condition():
    """SGD: ``pred_i = (lr/N) sum_j (d_w <g_w^i, g_w^j> - d_l <g_w^i, g_l^j>)`` with per-sequence
    gradients by brute force (``d_w = d_l = beta/2`` at the start); at a small rate the
    prediction matches the realized change of step 1, for SGD and for AdamW."""
    pairs = as_preference_pairs(templated_pairs(5, seed=0))
    setup = PredictionSetup("tiny-llama", beta=0.1, batch_size=2)
    lr = 1e-2
    pred = first_step_predictions(setup, pairs, "sgd", lr, cache=False)
    assert list(pred.columns) == ["pair", "first_step_chosen", "first_step_rejected"]

    loaded = load_model("tiny-llama")
    model, tok = loaded.model, loaded.tokenizer
    params = [p for p in model.parameters() if p.requires_grad]

    def grad(prompt: str, response: str) -> torch.Tensor:
        u = sequence_logprobs(model, tokenize(tok, [prompt], [response]))[0]
        return torch.cat([g.flatten() for g in torch.autograd.grad(u, params)]).double()

    before = [p.detach().clone() for p in params]
    cfg = TrainConfig(steps=3, batch_size=2, grad_accum=3, lr=lr, optimizer="sgd", loss="dpo",
                      loss_params={"beta": 0.1}, progress=False)  # fmt: skip
    direct = first_step_changes(model, tok, pairs, cfg)
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))  # left as it was
    pd.testing.assert_frame_equal(direct, pred)
    g_w = torch.stack([grad(p.prompt, p.chosen) for p in pairs])
    g_l = torch.stack([grad(p.prompt, p.rejected) for p in pairs])
    step = lr * (0.05 * g_w - 0.05 * g_l).mean(0)
    np.testing.assert_allclose(pred["first_step_chosen"], g_w @ step, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(pred["first_step_rejected"], g_l @ step, rtol=1e-4, atol=1e-9)

    for optimizer, rate in (("sgd", 1e-4), ("adamw", 1e-5)):
        pred = first_step_predictions(setup, pairs, optimizer, rate, cache=False)
        real = realized_changes(setup, pairs, optimizer, rate, steps=1, cache=False)
        real = real.sort_values("pair")
        scale = float(np.abs(real["delta_chosen"]).max())
        np.testing.assert_allclose(
            pred["first_step_chosen"], real["delta_chosen"], rtol=0, atol=0.05 * scale
        )


def test_scored_pairs_of_a_model_folder_follow_its_weights(
    tmp_path, monkeypatch, tiny_llama_folder
):
    from ge_utils.data import sentiment_pairs
    from ge_utils.predict import scored_pairs

    monkeypatch.setenv("GE_UTILS_CACHE", str(tmp_path / "cache"))
    loaded, folder = tiny_llama_folder
    setup = PredictionSetup(model=str(folder), device="cpu", batch_size=4)
    pairs = sentiment_pairs(2, 0, "long")[0]
    before = scored_pairs(setup, pairs, eta=1.0)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.mul_(2.0)
    loaded.model.save_pretrained(folder)  # new weights at the same path
    after = scored_pairs(setup, pairs, eta=1.0)
    fresh = scored_pairs(setup, pairs, eta=1.0, cache=False)
    assert not np.allclose(after["logp_chosen"], before["logp_chosen"])
    np.testing.assert_allclose(after["logp_chosen"], fresh["logp_chosen"], rtol=1e-6)
