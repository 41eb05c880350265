"""Tiny, randomly initialized Hugging Face causal LMs of many families, built from a config on
the spot (nothing downloaded), for tests of the package on models other than its own."""

from __future__ import annotations

import functools

import torch

TINY_SIZES = dict(
    vocab_size=30,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
# model type -> (what it adds to the test: a layout or a layer kind, its own config settings)
HF_ARCHS = {
    "gpt_neox": ("fused q, k, v; parallel residual", {}),
    "qwen3": ("per-head q and k norms: (N, T, heads, d) rows", {"head_dim": 8}),
    "gemma": ("scaled embedding, tied; norm scaled by 1 + w", {"head_dim": 8}),
    "gemma3_text": ("per-head norms laid out (N, heads, T, d)", {"head_dim": 8}),
    "phi": ("LayerNorm with bias, partial rotary", {}),
    "bloom": ("ALiBi, a norm on the embeddings", {}),
    "falcon": ("multi-query attention, fused q, k, v", {}),
    "gpt_bigcode": ("Conv1D-free GPT-2 variant, multi-query", {}),
    "gptj": ("rotary on part of each head", {"rotary_dim": 4}),
    "olmo": ("LayerNorm without parameters", {}),
    "cohere": ("its own LayerNorm class, logits times a scale", {}),
    "gemma2": ("logits soft-capped, sliding-window layers", {"head_dim": 8}),
    "granite": ("logits divided by a scaling, residual multipliers", {"logits_scaling": 4.0}),
    "opt": (
        "learned positions from the mask, offset 2; MLP rows flattened over the batch",
        {"ffn_dim": 64, "word_embed_proj_dim": 32},
    ),
    "biogpt": ("learned positions from the mask; embedding scaled by a Python float", {}),
    "mixtral": (
        "mixture of experts: a router's tuple output, stacked experts (the eager loop, which "
        "also runs in float64)",
        {"num_local_experts": 4, "num_experts_per_tok": 2, "experts_implementation": "eager"},
    ),
}


def hf_model(model_type: str, **settings):
    """A tiny Hugging Face causal LM of ``model_type``, random weights (seed 0), in eval mode;
    ``settings`` override those of :data:`HF_ARCHS` (a family's own) and :data:`TINY_SIZES`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {**HF_ARCHS.get(model_type, ("", {}))[1], **settings}
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**TINY_SIZES, **settings})
    return AutoModelForCausalLM.from_config(config).eval()


def gpt_oss_model(experts_implementation: str = "eager"):
    """A tiny GPT-OSS (4 experts, 2 per token; eager attention, which returns the probabilities
    its sinks' rule reads) with attention sinks of unit scale (initialized near zero); float64
    with the eager experts, float32 with transformers' batched or grouped products (which need
    it)."""
    model = hf_model(
        "gpt_oss",
        num_local_experts=4,
        num_experts_per_tok=2,
        experts_implementation=experts_implementation,
        attn_implementation="eager",
    )
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in model.model.layers:
            sinks = layer.self_attn.sinks
            sinks.copy_(torch.randn(sinks.shape, generator=gen))
    return model.double() if experts_implementation == "eager" else model


def use_rescaled_routers(model):
    """``model`` (a Mixtral) with its routers replaced, in place, by ones that return half their
    logits (:class:`RescaledLogitsRouter`: not ``x W^T``, so of no kind the fast statistics have
    a rule for; random weights)."""
    gen = torch.Generator().manual_seed(1)
    for layer in model.model.layers:
        router = rescaled_logits_router()(model.config).to(model.dtype)
        with torch.no_grad():
            for p in router.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        layer.mlp.gate = router
    return model


@functools.cache
def rescaled_logits_router() -> type:
    """``RescaledLogitsRouter``: a Mixtral router that returns half its logits (the scores come
    from the whole ones)."""
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    class RescaledLogitsRouter(MixtralTopKRouter):
        def forward(self, hidden_states: torch.Tensor):
            logits, scores, index = super().forward(hidden_states)
            return 0.5 * logits, scores, index

    return RescaledLogitsRouter
