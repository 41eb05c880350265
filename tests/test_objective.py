"""The one training-objective interface: every loss and mitigation implements it, and the
training loop uses nothing else (a new objective trains without touching the loop)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

import ge_utils.training as training
from ge_utils.logprobs import build_batch, eval_mode, pad_id
from ge_utils.losses import LOSSES, get_loss
from ge_utils.mitigations import MITIGATIONS, get_objective
from ge_utils.models import tiny_causal_lm
from ge_utils.objective import Objective, pair_logps
from ge_utils.training import TrainConfig, preference_optimization

PAIRS = [
    {"prompt": "The film was a delight.", "chosen": "Positive sentiment.", "rejected": "No."},
    {"prompt": "The food was cold.", "chosen": "Negative sentiment.", "rejected": "Yes it was."},
    {"prompt": "The film was slow.", "chosen": "Negative.", "rejected": "Positive sentiment."},
]


@pytest.mark.parametrize("name", [*LOSSES, *MITIGATIONS])
def test_every_loss_and_mitigation_is_an_objective(name):
    objective = get_objective(name)
    assert isinstance(objective, Objective) and objective.name == name
    masked = name in ("masked_dpo", "oracle_masked_dpo")
    assert objective.needs_token_reference == masked
    assert objective.reports_pair_stats == (not masked)
    logged = objective.logged
    assert logged is objective if name in LOSSES else logged.name == "dpo"


class Recorded(Objective):
    """DPO, plus a parameter of its own and a frame of its own: what the loop must honour."""

    def __init__(self) -> None:
        self.inner = get_loss("dpo", beta=0.1)
        self.scale = nn.Parameter(torch.zeros(()))
        self.prepared: set[int] = set()
        self.steps: list[int] = []

    @property
    def name(self) -> str:
        return "recorded"

    @property
    def logged(self):
        return self.inner

    def prepare(self, model, token_ids):
        self.prepared = set(token_ids)

    def param_group(self):
        return {"params": [self.scale], "lr": 0.5}

    def microstep(self, model, chosen, rejected, ref, n_total, record_stats=False, ref_tokens=None):
        self.steps.append(len(chosen))
        (self.scale * 1.0).backward()  # d/d scale = 1: the optimizer must move it
        return self.inner.microstep(model, chosen, rejected, ref, n_total, record_stats)

    def log_frames(self, step, decode):
        return {"recorded": pd.DataFrame({"step": [step], "calls": [len(self.steps)]})}


def _train(tokenizer, monkeypatch, objective=None):
    if objective is not None:
        monkeypatch.setattr(training, "get_objective", lambda name, **kw: objective)
    model = tiny_causal_lm("llama", len(tokenizer), seed=0)
    cfg = TrainConfig(
        steps=3, batch_size=2, lr=1e-2, eval_every=2, stats_method="none", progress=False
    )
    return model, preference_optimization(model, tokenizer, PAIRS, PAIRS[:2], cfg)


def test_a_new_objective_trains_through_the_interface_alone(tokenizer, monkeypatch):
    _, plain = _train(tokenizer, monkeypatch)
    objective = Recorded()
    _, res = _train(tokenizer, monkeypatch, objective)
    enc = training.encode_pairs(tokenizer, PAIRS)
    assert objective.prepared == {t for s in enc.chosen + enc.rejected for t in s}
    assert objective.steps == [2, 2, 2]  # one micro-batch of 2 pairs per step
    assert float(objective.scale) < 0  # its parameter group was trained
    assert list(res.extra["recorded"]["step"]) == [0, 2, 3]
    assert list(res.extra["recorded"]["calls"]) == [0, 2, 3]
    pd.testing.assert_frame_equal(res.pairs, plain.pairs)  # the same DPO otherwise
    cols = ["step", "loss", "train_margin"]
    pd.testing.assert_frame_equal(res.steps[cols], plain.steps[cols])


def test_pair_logps_from_batches_or_lengths_agree(tokenizer):
    pad = pad_id(tokenizer)
    c = build_batch([([1, 2], [5, 6, 7]), ([1], [8])], pad)
    r = build_batch([([1, 2], [9]), ([1], [5, 6])], pad)
    u_w, u_l = torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -4.0])
    a = pair_logps(u_w, u_l, c, r, (u_w - 1, u_l + 1))
    b = pair_logps(u_w, u_l, torch.tensor([3, 1]), torch.tensor([1, 2]), (u_w - 1, u_l + 1))
    for field in ("chosen", "rejected", "ref_chosen", "ref_rejected", "len_chosen", "len_rejected"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.len_chosen.tolist() == [3.0, 1.0] and a.len_chosen.dtype == u_w.dtype
    no_ref = pair_logps(u_w, u_l, c, r)
    assert torch.equal(no_ref.reward_chosen, torch.zeros(2))


def test_eval_mode_restores_the_previous_mode_even_on_error(tokenizer):
    model = tiny_causal_lm("llama", len(tokenizer), seed=0).train()
    with eval_mode(model) as inside:
        assert inside is model and not model.training
    assert model.training
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("boom")
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    with eval_mode(model):
        pass
    assert not model.training


def test_pad_id_policy():
    class Tok:
        def __init__(self, pad, eos):
            self.pad_token_id, self.eos_token_id = pad, eos

    assert [pad_id(Tok(3, 4)), pad_id(Tok(None, 4)), pad_id(Tok(None, None))] == [3, 4, 0]
