"""The shared experiments on a tiny model: SFT then preference, loss comparisons; caching."""

import pandas as pd
import pytest
import torch

import ge_utils.experiments as experiments
from ge_utils.logprobs import sequence_logprobs, tokenize
from ge_utils.spec import ExperimentSpec
from ge_utils.training import TrainConfig


def test_tiny_experiment_runs_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("GE_UTILS_CACHE", str(tmp_path))
    sft_cfg = TrainConfig(steps=2, batch_size=4, lr=1e-3, progress=False)
    po_cfg = TrainConfig(
        steps=3, batch_size=4, lr=1e-3, eval_every=3, progress=False, train_stats=True
    )
    spec = ExperimentSpec(
        model="tiny-llama", sft=sft_cfg, po=po_cfg, n_train=8, n_eval=4, n_probe=2, device="cpu"
    )
    first = experiments.sft_then_preference(spec)
    assert len(first.sft) == 2 and len(first.run.steps) == 3
    assert set(first.run.pairs["split"]) == {"eval", "probe", "train"}

    def boom(*args, **kw):
        raise AssertionError("retrained despite the cache")

    monkeypatch.setattr(experiments, "preference_optimization", boom)
    again = experiments.sft_then_preference(spec)
    pd.testing.assert_frame_equal(
        first.run.pairs.reset_index(drop=True), again.run.pairs, check_dtype=False
    )


def test_loss_comparison_shares_one_sft_and_caches_each_run(tmp_path, monkeypatch):
    monkeypatch.setenv("GE_UTILS_CACHE", str(tmp_path))
    sft_calls = []
    real_sft = experiments.sft

    def counting_sft(*args, **kw):
        sft_calls.append(1)
        return real_sft(*args, **kw)

    monkeypatch.setattr(experiments, "sft", counting_sft)
    sft_cfg = TrainConfig(steps=2, batch_size=4, lr=1e-3, progress=False)
    po_cfg = TrainConfig(
        steps=2, batch_size=4, lr=1e-3, eval_every=1, progress=False, train_stats=True
    )
    spec = ExperimentSpec(model="tiny-llama", sft=sft_cfg, po=po_cfg, n_train=8, n_eval=4)
    losses = {"dpo": {}, "masked_dpo": {"lam": 0.2}}
    res = experiments.loss_comparison(spec, losses)
    assert len(sft_calls) == 1
    assert set(res.means()["loss"]) == {"dpo", "masked_dpo"}
    assert set(res.pairs("train")["loss"]) == {"dpo"}  # no unmasked statistics for a mask
    assert set(res.answers["step"]) == {0, 2} and res.answers["correct"].dtype == bool
    tokens = res.tokens[res.tokens["step"] == 0]
    whole = res.means().query("step == 0 and loss == 'dpo'")["logp_chosen"].iloc[0]
    split = (tokens["contrastive_chosen"] + tokens["shared_chosen"]).mean()
    assert abs(split - whole) < 1e-4  # the two token groups add up to the response
    mask = res.runs["masked_dpo"].extra["mask"]
    contrastive = set(mask[mask["contrastive"]]["token"].str.strip())
    assert contrastive == {"Positive", "Negative"}
    agreement = experiments.direction_agreement(res.runs["dpo"])
    assert list(agreement["from_step"]) == [0, 1] and agreement["agree"].notna().all()
    again = experiments.loss_comparison(spec, {"dpo": {}})
    assert len(sft_calls) == 1  # cached: no second SFT
    pd.testing.assert_frame_equal(again.runs["dpo"].steps, res.runs["dpo"].steps)


def test_loss_comparison_rejects_bad_objectives(tmp_path, monkeypatch):
    monkeypatch.setenv("GE_UTILS_CACHE", str(tmp_path))
    spec = ExperimentSpec(po=TrainConfig(steps=1, progress=False))
    with pytest.raises(ValueError, match="unknown loss 'dpoo'"):
        experiments.loss_comparison(spec, {"dpoo": {}})
    with pytest.raises(ValueError, match="'beta' must be > 0"):
        experiments.loss_comparison(spec, {"dpo": {"beta": -1}})
    with pytest.raises(ValueError, match="no objectives given"):
        experiments.loss_comparison(spec, {})
    with pytest.raises(ValueError, match="no objectives given"):
        experiments.step_costs("tiny-llama", {})
    with pytest.raises(ValueError, match="unknown loss 'masked'"):
        experiments.step_costs("tiny-llama", {"masked": {}})


def test_realized_cases_label_every_interval():
    from ge_utils.training import RunResult

    pairs = pd.DataFrame(
        {
            "step": [0, 2, 4] * 2,
            "split": "eval",
            "pair": [0, 0, 0, 1, 1, 1],
            "logp_chosen": [-5.0, -4.0, -6.0, -3.0, -2.0, -2.5],
            "logp_rejected": [-5.0, -7.0, -6.0, -3.0, -1.0, -0.5],
        }
    )
    cases = experiments.realized_cases(RunResult(pd.DataFrame(), pairs))
    assert cases.to_dict("list") == {
        "step": [0, 2, 0, 2],
        "pair": [0, 0, 1, 1],
        "case": [1, 4, 3, 4],
    }


def test_step_costs_time_every_objective_side_by_side():
    costs = experiments.step_costs("tiny-llama", {"dpo": {}, "normalized_dpo": {}}, repeats=1)
    assert list(costs.index) == ["dpo", "normalized_dpo"]
    assert costs.loc["dpo", "ratio"] == 1.0 and (costs["seconds"] > 0).all()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_batched_greedy_answers_equal_each_prompt_alone(name):
    """Left-padded batch generation gives every prompt the continuation it gets alone."""
    from ge_utils.data import sentiment_pairs
    from ge_utils.logprobs import pad_id, prompt_ids, response_ids
    from ge_utils.models import load_model

    loaded = load_model(name, device="cpu")
    model, tok = loaded.model.eval(), loaded.tokenizer
    _, pairs = sentiment_pairs(4, 8, config="mixed_length", seed=3)
    assert len({len(prompt_ids(tok, p.prompt)) for p in pairs}) > 1, "prompts of one length"
    batched = experiments.greedy_answers(model, tok, pairs)
    for i, p in enumerate(pairs):
        prompt, want = prompt_ids(tok, p.prompt), response_ids(tok, p.chosen)
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=len(want),
            do_sample=False,
            pad_token_id=pad_id(tok),
        )
        alone = out[0, len(prompt) :].tolist()
        assert batched.loc[i, "answer"] == tok.decode(alone), i
        assert batched.loc[i, "exact"] == (alone == want), i
    assert batched["correct"].any(), "the pre-trained tiny model answers nothing correctly"
    with pytest.raises(ValueError, match="no pairs"):
        experiments.greedy_answers(model, tok, [])


def test_tokenwise_study_cells_add_up_to_the_sequence_gradients(tmp_path, monkeypatch):
    """Before DPO (no SFT: the model as loaded) the cells of a pair sum to the brute-force
    ``<g_w, g_l>`` and the norm columns are ``|g_w|^2`` and ``|g_l|^2`` (autograd)."""
    monkeypatch.setenv("GE_UTILS_CACHE", str(tmp_path))
    po_cfg = TrainConfig(steps=2, batch_size=4, lr=1e-3, progress=False)
    spec = ExperimentSpec(
        model="tiny-llama", sft=None, po=po_cfg, n_train=8, n_eval=2, n_probe=0, device="cpu"
    )
    cells = experiments.tokenwise_study(spec)["matrices"]
    assert set(cells["step"]) == {0, 2}
    _, held = experiments.experiment_data(spec)
    loaded = experiments._load(spec)
    net = loaded.model.eval()
    params = [p for p in net.parameters() if p.requires_grad]

    def grad(response: str) -> torch.Tensor:
        batch = tokenize(loaded.tokenizer, [held[0].prompt], [response], "none")
        logp = sequence_logprobs(net, batch).sum()
        return torch.cat([g.flatten() for g in torch.autograd.grad(logp, params)])

    g_w, g_l = grad(held[0].chosen), grad(held[0].rejected)
    start = cells[(cells["step"] == 0) & (cells["pair"] == 0)]
    assert start["inner"].sum() == pytest.approx(float(g_w @ g_l), rel=1e-4)
    assert start["norm2_chosen"].unique() == pytest.approx([float(g_w @ g_w)], rel=1e-4)
    assert start["norm2_rejected"].unique() == pytest.approx([float(g_l @ g_l)], rel=1e-4)


def test_an_edited_data_file_or_model_folder_is_rerun(tmp_path, monkeypatch, tiny_llama_folder):
    import json

    from ge_utils.data import sentiment_pairs

    monkeypatch.setenv("GE_UTILS_CACHE", str(tmp_path / "cache"))
    loaded, folder = tiny_llama_folder
    train, held = sentiment_pairs(4, 2, "long")
    pairs = train + held
    data = tmp_path / "my.jsonl"

    def write(swap: bool) -> None:
        rows = [
            {"prompt": p.prompt, "chosen": p.rejected if swap else p.chosen,
             "rejected": p.chosen if swap else p.rejected}
            for p in pairs
        ]  # fmt: skip
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    write(False)
    spec = ExperimentSpec(
        model=str(folder), dataset=str(data), n_train=4, n_eval=2, n_probe=1, device="cpu",
        po=TrainConfig(steps=1, batch_size=4, eval_every=1, progress=False),
    )  # fmt: skip
    runs = []
    real = experiments.preference_optimization
    monkeypatch.setattr(
        experiments, "preference_optimization", lambda *a, **k: runs.append(1) or real(*a, **k)
    )

    def logps():
        return experiments.sft_then_preference(spec).run.pairs["logp_chosen"].to_numpy()

    first = logps()
    write(True)  # chosen and rejected swapped at the same path
    swapped = logps()
    assert len(runs) == 2 and not (swapped == first).all()
    write(False)
    assert (logps() == first).all() and len(runs) == 2  # the same content: cached
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.mul_(0.5)
    loaded.model.save_pretrained(folder)  # new weights in the same folder
    halved = logps()
    assert len(runs) == 3 and not (halved == first).all()
