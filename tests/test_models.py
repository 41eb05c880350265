"""Model loading: offline SmolLM2, tiny pre-trained models, local folders, freezing, LoRA."""

import pytest
import torch

from ge_utils.models import load_model, pretrained_tiny, tiny_causal_lm, train_last_k_blocks


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m-instruct", device="cpu")


def test_offline_pretrained_default_loads_and_tokenizes_as_documented(smollm2):
    tok = smollm2.tokenizer
    assert type(smollm2.model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in smollm2.model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert len(tok("Positive.", add_special_tokens=False).input_ids) == 2
    assert len(tok("Positive", add_special_tokens=False).input_ids) == 1
    long = "Positive sentiment based on my judgement."
    assert len(tok(long, add_special_tokens=False).input_ids) == 7
    assert tok.pad_token_id is not None
    assert tok.chat_template is not None


def test_tiny_pretrained_is_deterministic_and_learned(tmp_path, monkeypatch):
    monkeypatch.setenv("GE_UTILS_CACHE", str(tmp_path))
    a, tok = pretrained_tiny("llama", seed=1, steps=30)
    b, _ = pretrained_tiny("llama", seed=1, steps=30, use_cache=False)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    fresh = tiny_causal_lm("llama", len(tok), hidden=64, seed=1)
    enc = tok(
        ["What is the sentiment of this statement? The pizza was outstanding."], return_tensors="pt"
    )
    trained_loss = a(**enc, labels=enc.input_ids).loss
    random_loss = fresh(**enc, labels=enc.input_ids).loss
    assert trained_loss < random_loss - 1.0
    cached, _ = pretrained_tiny("llama", seed=1, steps=30)  # from the cache folder
    assert torch.equal(next(cached.parameters()), next(a.parameters()))


def test_local_folder_last_k_and_lora(tmp_path, tokenizer):
    model = tiny_causal_lm("gpt2", len(tokenizer), layers=3)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"), device="cpu", train_last_k=1)
    trainable = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert trainable and all(
        n.startswith(("transformer.h.2.", "transformer.ln_f")) for n in trainable
    )
    lora = load_model(str(tmp_path / "m"), device="cpu", lora_rank=4)
    names = [n for n, p in lora.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    with pytest.raises(ValueError, match=r"train_last_k must be in 1\.\.3"):
        train_last_k_blocks(model, 5)


def test_missing_models_fail_clearly(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "no-such-model"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="cannot be reached"):
        load_model("someone/not-a-cached-model")
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model("tiny-llama", dtype="float8")
