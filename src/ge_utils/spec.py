"""The experiment spec: everything that determines a run's numbers, in one frozen record.

A recipe of :mod:`ge_utils.experiments` takes an :class:`ExperimentSpec`; its cache key is the
spec's fields (:meth:`ExperimentSpec.key`), so a parameter that changes a result cannot be left
out of the key. A model or data given as a local path is keyed by its content too
(:func:`model_fingerprint`, :func:`dataset_fingerprint`): editing the files at the same path
makes a new key, never a stale cached result; a Hub name is keyed by the revision the local
Hugging Face cache holds, so a newer snapshot makes a new key too. A notebook builds its spec
from its papermill parameters in one call::

    spec = spec_from_params(globals(), train_stats=True)

and runs it over its ``seeds`` with :meth:`ExperimentSpec.with_seed`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ge_utils.data import CONFIG_SUFFIXES
from ge_utils.hub import adapter_base, cached_dataset_revision, cached_model_revision
from ge_utils.io import content_digest
from ge_utils.models import DEFAULT_MODEL, TINY_MODELS, LoraSettings, device_key
from ge_utils.training import TrainConfig

CACHE_VERSION = 5  # bump when a change of code changes results, so old cached runs are not reused
# (5: log-probs of models whose config transforms their logits, e.g. Cohere, Gemma 2, Granite)


@dataclass(frozen=True)
class ExperimentSpec:
    """Model, data, sizes, seed, device, dtype, LoRA and the two training phases of a run.

    ``dataset``: ``"synthetic"`` (the sentiment task in response configuration ``config``,
    with ``suffix``, when given, replacing the configuration's text after the label word), or a
    JSONL file / Hugging Face dataset name. The probe set is the first ``n_probe`` held-out
    pairs. ``sft`` is ``None`` to start preference optimization from the model as it is. A
    ``suffix`` equal to the configuration's own (``long`` with ``" sentiment based on my
    judgement."``) is stored as ``None``: the same data has one cache key.
    """

    model: str = "tiny-llama"
    dataset: str = "synthetic"
    config: str = "long"
    suffix: str | None = None
    n_train: int = 64
    n_eval: int = 16
    n_probe: int = 4
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    lora: LoraSettings | None = None
    train_last_k: int | None = None
    sft: TrainConfig | None = None
    po: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        for name in ("n_train", "n_eval", "n_probe", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.n_probe > self.n_eval:
            raise ValueError(f"n_probe ({self.n_probe}) exceeds n_eval ({self.n_eval})")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty string, got {self.model!r}")
        if self.suffix is not None and not isinstance(self.suffix, str):
            raise ValueError(f"suffix must be a string or None, got {self.suffix!r}")
        if self.dataset == "synthetic" and self.suffix == CONFIG_SUFFIXES.get(self.config):
            object.__setattr__(self, "suffix", None)  # the same data: one cache key

    def with_seed(self, seed: int) -> ExperimentSpec:
        """The same spec with ``seed`` for data, model initialization and both phases."""
        sft = replace(self.sft, seed=seed) if self.sft is not None else None
        return replace(self, seed=seed, sft=sft, po=replace(self.po, seed=seed))

    def key(self, **extra: Any) -> dict[str, Any]:
        """The cache key: every field (training configs without their progress flag; the
        device as the kind it resolves to and the CPU's thread count,
        :func:`~ge_utils.models.device_key`), the content of a local model folder or data
        file/folder or the revision of a Hub name in the local Hugging Face cache
        (:func:`model_fingerprint`, :func:`dataset_fingerprint`; nothing added for built-in model
        names, uncached Hub names or synthetic data), the code version, and ``extra`` (a
        recipe's own arguments)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(device_key(self.device))
        out.update(model_fingerprint(self.model))
        out.update(dataset_fingerprint(self.dataset))
        out["lora"] = asdict(self.lora) if self.lora is not None else None
        out["sft"] = _config_key(self.sft)
        out["po"] = _config_key(self.po)
        return {**out, **extra, "version": CACHE_VERSION}


# The files of a model folder that fix its numbers: config, tokenizer files (tokenizer*.json,
# special_tokens_map.json, vocab.txt, merges.txt, *.model, chat templates) and weights.
MODEL_FILES = ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.safetensors", "*.bin")


def model_fingerprint(model: str) -> dict[str, str]:
    """What of a model the name does not say, for a cache key.

    ``{"model_digest": ...}`` for a local model folder (a path that exists and is not a
    built-in name: ``load_model`` loads those from the path): a digest of its top-level
    :data:`MODEL_FILES` (:func:`ge_utils.io.content_digest`, memoized by file stat).
    ``{"model_revision": <commit hash>}`` for a Hub name in the local Hugging Face cache: the
    snapshot ``refs/main`` points to when the key is made
    (:func:`ge_utils.hub.cached_model_revision`), which ``load_model`` loads, online too, so a
    newer snapshot makes a new key. A saved adapter (local or cached) whose base model is a
    cached Hub name adds ``{"base_model_revision": <commit hash>}``, the base snapshot it
    loads on (:func:`ge_utils.hub.adapter_base_revision`); one whose base is a local folder adds
    ``{"base_model_digest": ...}``, the digest of that folder's model files, as above.
    ``{}`` for the built-in names (``smollm2-135m-instruct``, ``default``, ``tiny-*``: their
    keys stay as they were) and for a Hub name not cached (keyed by its name only: the loader
    downloads the Hub's current revision, or fails offline)."""
    if model in (DEFAULT_MODEL, "default") or model in TINY_MODELS:
        return {}
    if Path(model).exists():
        out = {"model_digest": content_digest(model, MODEL_FILES, recursive=False)}
    else:
        revision = cached_model_revision(model)
        out = {"model_revision": revision} if revision else {}
    base = adapter_base(model)
    if base is None:
        return out
    if Path(base).exists():
        return out | {"base_model_digest": content_digest(base, MODEL_FILES, recursive=False)}
    revision = cached_model_revision(base)
    return out | ({"base_model_revision": revision} if revision else {})


def dataset_fingerprint(dataset: str) -> dict[str, str]:
    """What of the data the name does not say, for a cache key.

    ``{"dataset_digest": ...}`` when ``dataset`` is a local file or folder (every file in it,
    :func:`ge_utils.io.content_digest`). ``{"dataset_revision": <commit hash>}`` for a Hub name
    with a prepared copy in the local ``datasets`` cache: the revision of the newest copy, which
    ``load_pairs`` reads, online too (:func:`ge_utils.hub.cached_dataset_revision`).
    ``{}`` for ``"synthetic"`` and for a Hub name not cached (keyed by its name only)."""
    if dataset == "synthetic":
        return {}
    if Path(dataset).exists():
        return {"dataset_digest": content_digest(dataset)}
    revision = cached_dataset_revision(dataset)
    return {"dataset_revision": revision} if revision else {}


def _config_key(cfg: TrainConfig | None) -> dict[str, Any] | None:
    if cfg is None:
        return None
    out = asdict(cfg)
    out.pop("progress")  # a progress bar does not change a result
    return out


_SPEC_NAMES = (
    "model", "dataset", "config", "suffix", "n_train", "n_eval", "n_probe", "seed", "device",
    "dtype", "train_last_k",
)


def spec_from_params(params: Mapping[str, Any], **overrides: Any) -> ExperimentSpec:
    """An :class:`ExperimentSpec` from a notebook's parameters (e.g. ``globals()``).

    Reads the names it knows and ignores the rest: the spec fields above; ``lora_rank``,
    ``lora_alpha``, ``lora_dropout``, ``lora_targets``; the SFT phase from ``sft_steps`` (0: no
    SFT), ``sft_lr`` and ``sft_batch_size`` (None or absent: ``batch_size``); the preference
    phase from ``steps``, ``batch_size``, ``lr``, ``optimizer``, ``beta`` (DPO's beta), ``loss``,
    ``eval_every``, ``stats_method``, ``train_stats``; ``template`` for both. ``overrides``
    win over ``params``.
    """
    p = {**params, **overrides}
    if "suffix" in p and p["suffix"] is not None and not isinstance(p["suffix"], str):
        raise ValueError(f"suffix must be a string, got {p['suffix']!r}")
    seed = p.get("seed", 0)
    template = p.get("template", "none")
    sft = None
    if p.get("sft_steps", 0):
        sft = TrainConfig(
            steps=p["sft_steps"],
            batch_size=p.get("sft_batch_size") or p.get("batch_size", 8),
            lr=p["sft_lr"],
            seed=seed,
            template=template,
            progress=False,
        )
    po_names = ("steps", "batch_size", "lr", "optimizer", "loss", "eval_every", "stats_method",
                "train_stats")
    po = TrainConfig(
        **{k: p[k] for k in po_names if k in p},
        loss_params={"beta": p["beta"]} if "beta" in p else {},
        seed=seed,
        template=template,
        progress=False,
    )
    lora = None
    if p.get("lora_rank") is not None:
        lora = LoraSettings(
            r=p["lora_rank"],
            **{k: p[f"lora_{k}"] for k in ("alpha", "dropout") if p.get(f"lora_{k}") is not None},
            targets=tuple(p.get("lora_targets") or ()),
        )
    return ExperimentSpec(
        **{k: p[k] for k in _SPEC_NAMES if k in p}, lora=lora, sft=sft, po=po
    )
