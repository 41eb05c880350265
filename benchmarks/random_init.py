"""Folders of a config and a tokenizer, no weights, for ``bench_fast_gradients --random-init``:
timing on a machine that the checkpoint cannot reach (random weights cost what trained ones do).

    python -m benchmarks.random_init DIR      # DIR/smollm2-135m, DIR/llama-1b, ..., about 14 MB

``smollm2-135m``: the offline model's own config. ``llama-1b``: the same Llama architecture and
tokenizer, widened and deepened to about 1.07B parameters (hidden 2048, 16 layers, 32 query and 8
key-value heads, MLP 8192, tied embeddings), to show how the ratios scale. ``mixtral-smollm2``: a
Mixtral (mixture of experts) of SmolLM2's width, depth, attention and tokenizer whose MLPs are 8
experts of 768 with 2 per token (the dense MLP's 1536 of compute per token; about 350M
parameters), for the cost of the experts' statistics. ``gpt-oss-smollm2``: the same as a GPT-OSS
(routers and experts with biases, experts stored transposed, attention sinks, every other layer
attending to a sliding window of 128), for the cost of those rules.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from transformers import AutoConfig

from benchmarks.common import load

SHAPES: dict[str, dict[str, int | bool | str]] = {
    "smollm2-135m": {},
    "llama-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "tie_word_embeddings": True,
    },
    "mixtral-smollm2": {
        "model_type": "mixtral",
        "intermediate_size": 768,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    },
    "gpt-oss-smollm2": {
        "model_type": "gpt_oss",
        "intermediate_size": 768,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    },
}
# what a shape of another model type (``model_type``) takes over from the loaded model's config
SHARED = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
)


def write_folders(out: Path, model_name: str = "smollm2-135m-instruct") -> dict[str, Path]:
    """One folder per entry of :data:`SHAPES` under ``out``: ``config.json`` (the loaded
    model's config with the shape's changes) and the tokenizer's files."""
    model, tok = load(model_name)
    folders = {}
    for name, shape in SHAPES.items():
        changes = dict(shape)
        if "model_type" in changes:
            shared = {key: getattr(model.config, key) for key in SHARED}
            config = AutoConfig.for_model(str(changes.pop("model_type")), **shared)
        else:
            config = copy.deepcopy(model.config)
        for key, value in changes.items():
            setattr(config, key, value)
        folder = out / name
        config.save_pretrained(folder)
        tok.save_pretrained(folder)
        folders[name] = folder
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the config folders into")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="whose config/tokenizer")
    args = parser.parse_args()
    for name, folder in write_folders(args.out, args.model).items():
        size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
        print(f"{name}: {folder} ({size:.1f} MB)")


if __name__ == "__main__":
    main()
