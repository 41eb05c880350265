"""Shared fixtures: tiny random causal LMs of two architectures and a word-level tokenizer."""

from __future__ import annotations

import pytest
import torch

from ge_utils.models import tiny_causal_lm, word_tokenizer

CORPUS = [
    "The film was a delight from start to finish.",
    "The service was slow and the food was cold.",
    "Positive sentiment based on my judgement.",
    "Negative sentiment based on my judgement.",
]


@pytest.fixture(scope="session")
def tokenizer():
    return word_tokenizer(CORPUS)


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request, tokenizer):
    """Llama-style (untied) and GPT-2-style (tied embeddings) tiny models, float64, eval mode."""
    torch.manual_seed(0)
    return tiny_causal_lm(request.param, len(tokenizer)).double()


@pytest.fixture
def tiny_llama_folder(tmp_path):
    """The tiny Llama saved with its tokenizer to ``tmp_path / "mymodel"``: a local model
    folder, as a user's fine-tuned model would be. Returns (the loaded model, the folder)."""
    from ge_utils.models import load_model

    loaded = load_model("tiny-llama", device="cpu")
    folder = tmp_path / "mymodel"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return loaded, folder


@pytest.fixture(scope="session")
def smoke_book(tmp_path_factory):
    """The whole book at the smoke profile, built once per test run (tests/book_fixture.py)."""
    from book_fixture import build_smoke_book

    return build_smoke_book(tmp_path_factory.mktemp("smoke-book"))


@pytest.fixture
def one_thread():
    """Tiny tensors: a second thread only adds contention on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
