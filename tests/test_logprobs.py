"""Response log-probs against full-sequence forward passes, one sequence at a time."""

import pytest
import torch
from hf_models import HF_ARCHS, hf_model

from ge_utils.logprobs import build_batch, sequence_logprobs, token_logprobs, tokenize
from ge_utils.models import tiny_causal_lm

SEQS = [([2, 5, 7], [9, 3]), ([2, 4, 6, 8, 10], [11, 12, 13, 14]), ([2], [15])]


def brute_force(model, prompt, response):
    ids = torch.tensor([prompt + response])
    logp = model(ids).logits.log_softmax(-1)[0]
    return torch.stack([logp[len(prompt) - 1 + k, tok] for k, tok in enumerate(response)])


@pytest.mark.parametrize("side", ["left", "right"])
def test_token_and_sequence_logprobs_match_brute_force(tiny_model, side):
    batch = build_batch(SEQS, pad_id=0, padding_side=side)
    per_token = token_logprobs(tiny_model, batch)
    summed = sequence_logprobs(tiny_model, batch)
    averaged = sequence_logprobs(tiny_model, batch, average=True)
    for i, (prompt, response) in enumerate(SEQS):
        expected = brute_force(tiny_model, prompt, response)
        got = per_token[i][batch.response_mask[i]]
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(summed[i], expected.sum(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(averaged[i], expected.mean(), rtol=1e-10, atol=1e-12)
    assert (per_token[~batch.response_mask] == 0).all()


@pytest.mark.parametrize("model_type", sorted(HF_ARCHS))
def test_logprobs_of_other_families_match_their_own_logits(model_type):
    """Logit transforms of the config included (Cohere's scale, Granite's scaling, Gemma 2's
    soft-capping): the log-probs are those of the model's own forward."""
    model = hf_model(model_type).double()
    batch = build_batch(SEQS, pad_id=0, padding_side="right")
    per_token = token_logprobs(model, batch)
    for i, (prompt, response) in enumerate(SEQS):
        expected = brute_force(model, prompt, response)
        torch.testing.assert_close(
            per_token[i][batch.response_mask[i]], expected, rtol=1e-10, atol=1e-12
        )


def test_logits_the_package_does_not_reproduce_are_refused(tiny_model):
    """A config key the class does not apply (here a logit scale on a Llama) would make the
    head's logits differ from the model's: refused before any log-prob is returned."""
    tiny_model.config.logit_scale = 0.5
    batch = build_batch(SEQS, pad_id=0, padding_side="right")
    with pytest.raises(TypeError, match="does not reproduce"):
        token_logprobs(tiny_model, batch)
    del tiny_model.config.logit_scale
    token_logprobs(tiny_model, batch)  # a model refused once is checked again


def test_tokenize_raw_and_chat(tokenizer):
    prompt, response = "The film was a delight.", "Positive sentiment."
    raw = tokenize(tokenizer, [prompt], [response], template="none")
    expected = tokenizer(prompt).input_ids + tokenizer(response, add_special_tokens=False).input_ids
    assert raw.input_ids[0].tolist() == expected
    assert raw.response_lengths.tolist() == [3]
    chat = tokenize(tokenizer, [prompt], [response], template="chat")
    assert chat.input_ids.shape[1] > raw.input_ids.shape[1]
    assert chat.input_ids[0][chat.response_mask[0]].tolist() == expected[-3:]


def test_bad_input_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="empty response"):
        build_batch([([1, 2], [])], pad_id=0)
    with pytest.raises(ValueError, match="zero sequences"):
        build_batch([], pad_id=0)
    with pytest.raises(ValueError, match="padding_side"):
        build_batch(SEQS, pad_id=0, padding_side="middle")
    with pytest.raises(ValueError, match="unknown template"):
        tokenize(tokenizer, ["a"], ["b"], template="jinja")
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        tokenize(tokenizer, ["a", "b"], ["c"])


@pytest.mark.parametrize("side", ["left", "right"])
def test_trimmed_batch_drops_shared_padding_only(tiny_model, side):
    """A sub-batch of short sequences keeps the padding of the long ones until trimmed; the
    trimmed batch has the same log-probs (and a batch without shared padding is returned as
    is)."""
    batch = build_batch(SEQS, pad_id=0, padding_side=side)
    short = batch.select([0, 2])
    cut = short.trimmed()
    assert cut.input_ids.shape[1] == int(short.attention_mask.sum(1).max())
    assert batch.trimmed() is batch
    torch.testing.assert_close(
        sequence_logprobs(tiny_model, cut),
        sequence_logprobs(tiny_model, short),
        rtol=1e-10,
        atol=1e-12,
    )


def test_too_long_for_learned_positions_is_a_clear_error(tokenizer):
    """GPT-2 has a table of 128 learned positions: 130 tokens fail before the forward, naming
    both lengths; Llama's rotary positions have no such limit."""
    long = [([2] * 120, [3] * 10)]
    batch = build_batch(long, pad_id=0, padding_side="left")
    gpt2 = tiny_causal_lm("gpt2", len(tokenizer), max_positions=128)
    with pytest.raises(ValueError, match=r"longest sequence has 130 tokens .* at most 128"):
        sequence_logprobs(gpt2, batch)
    llama = tiny_causal_lm("llama", len(tokenizer), max_positions=128)
    assert torch.isfinite(sequence_logprobs(llama, batch)).all()
    exact = build_batch([([2] * 118, [3] * 10)], pad_id=0)  # 128 tokens: just fits
    assert torch.isfinite(sequence_logprobs(gpt2, exact)).all()


def test_token_id_outside_the_vocabulary_is_a_clear_error(tiny_model):
    vocab = tiny_model.get_input_embeddings().num_embeddings
    batch = build_batch([([2, 5], [vocab])], pad_id=0)
    with pytest.raises(ValueError, match=f"token id {vocab} is outside the model's vocabulary"):
        sequence_logprobs(tiny_model, batch)


def test_non_finite_weights_are_a_clear_error(tokenizer):
    model = tiny_causal_lm("llama", len(tokenizer))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="the model's logits are not finite"):
        sequence_logprobs(model, build_batch(SEQS, pad_id=0))


@pytest.mark.parametrize(
    ("prompts", "responses", "message"),
    [
        ("ab", ["c", "d"], r"prompts must be a sequence .* of strings, got str 'ab'"),
        (["a"], [None], r"responses\[0\] must be a str, got NoneType None"),
        (["a", 3], ["b", "c"], r"prompts\[1\] must be a str, got int 3"),
    ],
)
def test_tokenize_wants_sequences_of_strings(tokenizer, prompts, responses, message):
    with pytest.raises(TypeError, match=message):
        tokenize(tokenizer, prompts, responses)
