"""Models: tiny from-scratch causal LMs with a word-level tokenizer (smoke runs and tests)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Literal

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

TinyArch = Literal["llama", "gpt2"]
SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<bos> {{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<bos> assistant : {% endif %}"
)


def word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words and punctuation of ``texts``.

    Words and punctuation marks are separate tokens (``"Positive."`` -> ``Positive``, ``.``);
    ``tokenizer(text)`` prepends ``<bos>``; unknown words map to ``<unk>``. It has a minimal chat
    template so ``template='chat'`` works on tiny models too.
    """
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for text in [*texts, "user assistant :"]:
        for word in re.findall(r"\w+|[^\w\s]+", text):
            vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_causal_lm(
    arch: TinyArch,
    vocab_size: int,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    tie_embeddings: bool | None = None,
    max_positions: int = 128,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialized tiny causal LM in eval mode.

    ``llama``: RMSNorm, SwiGLU, RoPE, no biases, untied by default. ``gpt2``: LayerNorm, biases,
    learned positions, tied input/output embeddings by default.
    """
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(tie_embeddings),
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )
        model: PreTrainedModel = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_positions=max_positions,
            tie_word_embeddings=True if tie_embeddings is None else tie_embeddings,
            bos_token_id=None,
            eos_token_id=None,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected 'llama' or 'gpt2'")
    return model.eval()
