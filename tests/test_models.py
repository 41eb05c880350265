"""Model loading: offline SmolLM2, tiny pre-trained models, local folders, freezing, LoRA."""

import socket

import pytest
import torch

from ge_utils.models import (
    LoraSettings,
    add_lora,
    load_model,
    lora_settings,
    pretrained_tiny,
    resolve_device,
    tiny_causal_lm,
    train_last_k_blocks,
)


@pytest.fixture(scope="module")
def smollm2():
    """Loaded once per test session (the first load ever de-quantizes the GGUF file: ~21 s)."""
    return load_model("smollm2-135m-instruct", device="cpu")


def test_offline_pretrained_default_loads_and_tokenizes_as_documented(smollm2):
    tok = smollm2.tokenizer
    model = smollm2.model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert not hasattr(model.config, "quantization_config")
    assert next(model.parameters()).dtype == torch.float32
    assert len(tok("Positive.", add_special_tokens=False).input_ids) == 2
    assert len(tok("Positive", add_special_tokens=False).input_ids) == 1
    assert (
        tok("Positive", add_special_tokens=False).input_ids
        != tok(" Positive", add_special_tokens=False).input_ids
    )
    long = "Positive sentiment based on my judgement."
    assert len(tok(long, add_special_tokens=False).input_ids) == 7
    assert tok.pad_token_id is not None
    assert tok.chat_template is not None


def test_train_last_k_on_smollm2_keeps_last_blocks_and_final_norm(smollm2):
    trainable = train_last_k_blocks(smollm2.model, 2)
    try:
        expected = {
            n
            for n, _ in smollm2.model.named_parameters()
            if n.startswith(("model.layers.28.", "model.layers.29.", "model.norm."))
        }
        assert set(trainable) == expected and len(expected) == 2 * 9 + 1
    finally:
        smollm2.model.requires_grad_(True)


def test_tiny_pretrained_is_deterministic_and_learned(tmp_path, monkeypatch):
    monkeypatch.setenv("GE_UTILS_CACHE", str(tmp_path))
    a, tok = pretrained_tiny("llama", seed=1, steps=30)
    b, _ = pretrained_tiny("llama", seed=1, steps=30, cache=False)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    first, last = a.config.pretraining_losses
    assert last < first - 1.0
    fresh = tiny_causal_lm("llama", len(tok), hidden=64, seed=1)
    enc = tok(
        ["What is the sentiment of this statement? The pizza was outstanding."], return_tensors="pt"
    )
    trained_loss = a(**enc, labels=enc.input_ids).loss
    random_loss = fresh(**enc, labels=enc.input_ids).loss
    assert trained_loss < random_loss - 1.0
    assert [p.name.startswith("tiny-llama-") for p in tmp_path.iterdir()] == [True]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    cached, _ = pretrained_tiny("llama", seed=1, steps=30)  # from the cache folder
    for pa, pc in zip(a.parameters(), cached.parameters(), strict=True):
        assert torch.equal(pa, pc)
    other, _ = pretrained_tiny("llama", seed=2, steps=30)
    assert len(list(tmp_path.iterdir())) == 2  # a different recipe, a different cache entry
    assert not torch.equal(next(other.parameters()), next(a.parameters()))
    with pytest.raises(ValueError, match="unknown tiny architecture 'bert'"):
        pretrained_tiny("bert")


def test_load_model_tiny_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("GE_UTILS_CACHE", str(tmp_path))
    loaded = load_model("tiny-gpt2", dtype="float64", device="cpu", seed=3)
    assert type(loaded.model).__name__ == "GPT2LMHeadModel"
    assert next(loaded.model.parameters()).dtype == torch.float64
    assert loaded.tokenizer.pad_token == "<pad>" and not loaded.model.training


def save_tiny(folder, tokenizer, layers=3):
    model = tiny_causal_lm("gpt2", len(tokenizer), layers=layers)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def test_local_folder_loads_the_same_weights(tmp_path, tokenizer):
    model = save_tiny(tmp_path / "m", tokenizer)
    loaded = load_model(str(tmp_path / "m"), device="cpu")
    assert loaded.tokenizer.get_vocab() == tokenizer.get_vocab()
    ids = tokenizer(["The film was a delight."], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, model(ids).logits)


def test_train_last_k_freezes_the_right_parameters(tmp_path, tokenizer):
    save_tiny(tmp_path / "m", tokenizer)
    loaded = load_model(str(tmp_path / "m"), device="cpu", train_last_k=1)
    trainable = {n for n, p in loaded.model.named_parameters() if p.requires_grad}
    expected = {
        n
        for n, _ in loaded.model.named_parameters()
        if n.startswith(("transformer.h.2.", "transformer.ln_f."))
    }
    assert trainable == expected and expected
    assert not loaded.model.transformer.wte.weight.requires_grad  # tied with the output head
    with pytest.raises(ValueError, match=r"train_last_k must be in 1\.\.3, got 5"):
        train_last_k_blocks(loaded.model, 5)


def test_lora_wraps_with_the_given_settings(tmp_path, tokenizer):
    save_tiny(tmp_path / "m", tokenizer)
    by_rank = load_model(str(tmp_path / "m"), device="cpu", lora_rank=4)
    names = [n for n, p in by_rank.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    lora = LoraSettings(r=2, alpha=8, targets=("c_fc",))
    wrapped = load_model(str(tmp_path / "m"), device="cpu", lora=lora).model
    shapes = {n: p.shape for n, p in wrapped.named_parameters() if p.requires_grad}
    assert len(shapes) == 2 * 3 and all(".mlp.c_fc.lora_" in n for n in shapes)
    assert all(2 in s for s in shapes.values())
    assert wrapped.peft_config["default"].lora_alpha == 8
    with pytest.raises(ValueError, match="exclude each other"):
        load_model(str(tmp_path / "m"), device="cpu", lora=lora, train_last_k=1)
    with pytest.raises(ValueError, match="LoRA rank must be >= 1, got 0"):
        load_model(str(tmp_path / "m"), device="cpu", lora_rank=0)


def test_lora_as_the_authors_used_it(tmp_path, tokenizer):
    """alpha, dropout and targets reach every adapter: output = W x + (alpha / r) B A x."""
    save_tiny(tmp_path / "m", tokenizer)
    r, alpha = 4, 128
    lm = load_model(
        str(tmp_path / "m"),
        device="cpu",
        lora_rank=r,
        lora_alpha=alpha,
        lora_dropout=0.05,
        lora_targets=["c_attn", "c_fc"],
    )
    config = lm.model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (r, alpha, 0.05)
    adapted = {n.rsplit(".", 1)[1] for n, m in lm.model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"c_attn", "c_fc"}
    torch.manual_seed(0)
    for name, module in lm.model.named_modules():
        if not hasattr(module, "lora_A"):
            continue
        assert module.lora_dropout["default"].p == 0.05, name
        a, b = module.lora_A["default"], module.lora_B["default"]
        torch.nn.init.normal_(b.weight)  # peft starts B at 0: make the adapter visible
        x = torch.randn(3, a.in_features)
        with torch.no_grad():
            expected = module.base_layer(x) + alpha / r * (x @ a.weight.T @ b.weight.T)
            assert torch.allclose(module(x), expected, atol=1e-5), name
    same = load_model(
        str(tmp_path / "m"),
        device="cpu",
        lora=LoraSettings(r=r, alpha=alpha, dropout=0.05, targets=("c_attn", "c_fc")),
    )
    assert same.model.peft_config["default"].lora_alpha == alpha


def test_lora_settings_check_their_values():
    assert lora_settings(None) is None
    assert lora_settings(8) == LoraSettings(r=8, alpha=16)  # the former shorthand's scale
    assert lora_settings(64, 128, 0.05, ["q_proj", "k_proj", "v_proj"]).targets == (
        "q_proj",
        "k_proj",
        "v_proj",
    )
    with pytest.raises(ValueError, match="need lora_rank"):
        lora_settings(None, lora_alpha=128)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        LoraSettings(r=2, alpha=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        LoraSettings(r=2, dropout=1.0)
    with pytest.raises(ValueError, match="sequence of module names"):
        LoraSettings(r=2, targets="q_proj")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be an integer"):
        LoraSettings(r=2.0)  # type: ignore[arg-type]


def test_cached_hub_name_loads_offline(tmp_path, tokenizer, monkeypatch):
    import huggingface_hub.constants

    snapshot = tmp_path / "models--someone--tiny" / "snapshots" / "0123abc"
    model = save_tiny(snapshot, tokenizer)
    (tmp_path / "models--someone--tiny" / "refs").mkdir()
    (tmp_path / "models--someone--tiny" / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lookups = []

    def no_network(host, *args, **kwargs):
        lookups.append(host)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    loaded = load_model("someone/tiny", device="cpu")
    assert lookups == []  # cache only: no probe of the Hub (which retries for 23 s offline)
    ids = tokenizer(["The film was a delight."], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, model(ids).logits)


def test_missing_models_fail_clearly(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"no-such-model.*does not exist"):
        load_model(str(tmp_path / "no-such-model"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="'someone/not-a-cached-model' is not a local path"):
        load_model("someone/not-a-cached-model")
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_model("tiny-llama", dtype="float8")
    with pytest.raises(ValueError, match="non-empty string"):
        load_model("")


@pytest.mark.parametrize("device", ["gpu", "", "cuda:x"])
def test_unknown_device_names_the_accepted_values(tmp_path, tokenizer, device):
    with pytest.raises(ValueError, match=rf"unknown device '{device}'; expected cpu, cuda, cuda:N"):
        resolve_device(device)
    save_tiny(tmp_path / "m", tokenizer)
    with pytest.raises(ValueError, match="expected cpu, cuda, cuda:N, mps or auto"):
        load_model(str(tmp_path / "m"), device=device)


def test_missing_cuda_or_mps_device_is_a_value_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'cuda:1' requested but CUDA is not available"):
        resolve_device("cuda:1")
    with pytest.raises(ValueError, match="'mps' requested but MPS is not available"):
        resolve_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="'cuda:1' requested but this machine has 1 CUDA device"):
        resolve_device("cuda:1")


def test_model_folders_without_a_model_or_tokenizer_fail_clearly(tmp_path, tokenizer):
    save_tiny(tmp_path / "m", tokenizer)
    tiny_causal_lm("gpt2", len(tokenizer)).save_pretrained(tmp_path / "notok")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer files in '.*notok'"):
        load_model(str(tmp_path / "notok"), device="cpu")
    tokenizer.save_pretrained(tmp_path / "tokonly")
    with pytest.raises(FileNotFoundError, match=r"no config.json .* in '.*tokonly': not a saved"):
        load_model(str(tmp_path / "tokonly"), device="cpu")
    (tmp_path / "pairs.jsonl").write_text("{}\n")
    with pytest.raises(FileNotFoundError, match=r"'.*pairs.jsonl' is a file, not a model folder"):
        load_model(str(tmp_path / "pairs.jsonl"), device="cpu")


def test_saved_adapter_loads_with_its_weights_trainable(tmp_path, tokenizer):
    """A folder of adapter_config.json and adapter weights (what TRL's DPO with peft saves)
    loads on its base model with the adapter's weights, and those are what gradients are taken
    over (transformers loads them frozen)."""
    save_tiny(tmp_path / "base", tokenizer)
    base = load_model(str(tmp_path / "base"), device="cpu")
    tuned = add_lora(base.model, LoraSettings(r=2, targets=("c_attn",)))
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_()
    tuned.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    loaded = load_model(str(tmp_path / "adapter"), device="cpu")
    trainable = {n for n, p in loaded.model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 3 and all(".c_attn.lora_" in n for n in trainable)
    ids = tokenizer(["The film was a delight."], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, tuned(ids).logits)
    loaded.model(ids).logits.sum().backward()
    assert all(p.grad is not None for p in loaded.model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="is a saved adapter, trained as it is"):
        load_model(str(tmp_path / "adapter"), device="cpu", train_last_k=1)


@pytest.mark.parametrize(
    ("folder", "device", "message"),
    [
        ("m", "gpu", "error: unknown device 'gpu'; expected cpu, cuda, cuda:N, mps or auto"),
        ("notok", "cpu", "error: no tokenizer files in "),
    ],
)
def test_diagnose_reports_a_bad_device_or_folder_in_one_line(
    tmp_path, tokenizer, capsys, folder, device, message
):
    from ge_utils.__main__ import main

    save_tiny(tmp_path / "m", tokenizer)
    tiny_causal_lm("gpt2", len(tokenizer)).save_pretrained(tmp_path / "notok")
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "The film was", "chosen": " good", "rejected": " bad"}\n')
    args = ["--data", str(data), "--out", str(tmp_path / "o.csv"), "--device", device]
    capsys.readouterr()  # the progress bars of saving
    assert main(["diagnose", "--model", str(tmp_path / folder), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)
