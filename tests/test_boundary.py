"""The boundary map's two checks against the theory and against brute force (tiny models)."""

from __future__ import annotations

import pytest
import torch

from ge_utils.boundary import (
    Cell,
    GridSetup,
    batch_step_terms,
    boundary_map,
    gradient_gram,
    set_scope,
    shared_suffix,
    untie_output_layer,
)
from ge_utils.data import sentiment_pairs
from ge_utils.gradients import pair_logps
from ge_utils.logprobs import concat_batches, sequence_logprobs, tokenize
from ge_utils.losses import get_loss
from ge_utils.models import load_model


def test_head_only_plain_step_raises_chosen_and_lowers_rejected_for_every_pair():
    """Theorem 1's own cell: tied tiny GPT-2 with its head untied, output layer only, plain
    SGD, a small step, one single-token pair at a time, realized after one step."""
    tied = load_model("tiny-gpt2").model
    assert untie_output_layer(tied)
    assert tied.get_output_embeddings().weight is not tied.get_input_embeddings().weight
    setup = GridSetup(model="tiny-gpt2", n_pairs=12, n_eval=0, n_sft=8, device="cpu")
    result = boundary_map([Cell(lr=1e-2)], setup, seeds=[0, 1], cache=False)
    pairs = result.pairs
    assert len(pairs) == 24
    assert (pairs["delta_chosen"] > 0).all()
    assert (pairs["delta_rejected"] < 0).all()
    # first order: the prediction has the realized sign and size within 10%
    rel = (pairs["delta_chosen"] - pairs["pred_chosen"]).abs() / pairs["pred_chosen"].abs()
    assert rel.max() < 0.1


def test_head_scope_freezes_the_input_embedding():
    model = load_model("tiny-gpt2").model
    names = set_scope(model, "head")
    assert not model.get_input_embeddings().weight.requires_grad
    assert model.get_output_embeddings().weight.requires_grad
    assert len(names) == 1


def _flat_grads(model, value):
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).flatten()
            for p, g in zip(params, grads, strict=True)
        ]
    )


def test_batch_step_is_own_plus_cross_terms_and_matches_a_small_sgd_step():
    """Brute-force Gram (flattened gradients) against the ghost Gram; own + cross terms give the
    batch prediction, which matches the realized change of one small SGD step on the mean loss."""
    loaded = load_model("tiny-llama", device="cpu")
    model, tok = loaded.model.double(), loaded.tokenizer
    _, pairs = sentiment_pairs(0, 5, "single_bare", seed=3)
    prompts = [p.prompt for p in pairs]
    c = tokenize(tok, prompts, [p.chosen for p in pairs])
    r = tokenize(tok, prompts, [p.rejected for p in pairs])
    gram = gradient_gram(model, c, r)
    joint = concat_batches(c, r)
    flat = torch.stack(
        [_flat_grads(model, sequence_logprobs(model, joint.select([i]))[0]) for i in range(10)]
    )
    assert torch.allclose(gram, flat @ flat.T, rtol=1e-8, atol=1e-10)

    loss = get_loss("dpo", beta=0.1)
    u_w, u_l = sequence_logprobs(model, c), sequence_logprobs(model, r)
    ref = (u_w.detach() + 0.3, u_l.detach() - 0.2)  # rewards away from 0: d_w = d_l != beta/2
    p = pair_logps(u_w, u_l, c, r, ref)
    d_w, d_l = (d.detach() for d in loss.coefficients(p))
    eta = 1e-5
    terms = batch_step_terms(gram, d_w, d_l, eta)
    for side in ("chosen", "rejected"):
        total = terms[f"own_{side}"] + terms[f"cross_{side}"]
        assert torch.allclose(
            torch.tensor(total.values), torch.tensor(terms[f"pred_{side}"].values)
        )
    # brute force: the same prediction from the flattened batch gradient
    batch_grad = _flat_grads(model, loss.loss(p).mean())
    expected_w = -eta * flat[:5] @ batch_grad
    assert torch.allclose(torch.tensor(terms["pred_chosen"].values), expected_w, rtol=1e-8)
    # the realized change of one SGD step of size eta on the mean loss, to first order
    with torch.no_grad():
        saved = [q.detach().clone() for q in model.parameters()]
        offset = 0
        for q in model.parameters():
            q.sub_(eta * batch_grad[offset : offset + q.numel()].view_as(q))
            offset += q.numel()
        new_w, new_l = sequence_logprobs(model, c), sequence_logprobs(model, r)
        for q, s in zip(model.parameters(), saved, strict=True):
            q.copy_(s)
    real_w, real_l = (new_w - u_w.detach()).numpy(), (new_l - u_l.detach()).numpy()
    scale = max(abs(terms["pred_chosen"]).max(), abs(terms["pred_rejected"]).max())
    assert abs(real_w - terms["pred_chosen"].values).max() < 0.01 * scale
    assert abs(real_l - terms["pred_rejected"].values).max() < 0.01 * scale
    # the cross terms are not negligible here: shared label tokens, swapped roles
    assert (terms["cross_chosen"].abs() > 0).all()


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="scope"):
        Cell(scope="body")
    with pytest.raises(ValueError, match="response"):
        Cell(response="medium")
    with pytest.raises(ValueError, match="long_sft_steps"):
        GridSetup(short_sft_steps=4, long_sft_steps=4)
    with pytest.raises(ValueError, match="suffix length"):
        shared_suffix(99)
    with pytest.raises(ValueError, match="match"):
        batch_step_terms(torch.zeros(4, 4), torch.ones(3), torch.ones(3), 0.1)


def test_shared_suffix_lengths():
    assert shared_suffix(0) == "."
    assert shared_suffix(2) == " sentiment based."
    assert len(shared_suffix(12).split()) == 12
