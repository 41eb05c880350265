"""A Hub model or dataset name is keyed by the revision the local Hugging Face cache holds.

The caches are faked in ``tmp_path``, laid out as huggingface_hub and datasets lay them out, and
read by the real loaders (offline): the revision in the key is the one whose weights and rows
``load_model`` and ``load_pairs`` return, so a newer snapshot cannot be served stale numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from ge_utils.data import PreferencePair, load_pairs
from ge_utils.io import content_digest
from ge_utils.models import load_model, tiny_causal_lm
from ge_utils.spec import MODEL_FILES, ExperimentSpec, dataset_fingerprint, model_fingerprint
from ge_utils.training import params_hash

REV_A = "a" * 40
REV_B = "b" * 40
ROWS_A = [{"prompt": "Review: good.", "chosen": "Positive.", "rejected": "Negative."}]
ROWS_B = [{"prompt": "Review: bad.", "chosen": "Negative.", "rejected": "Positive."}]


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Empty Hub and datasets caches under ``tmp_path``, offline: (hub cache, datasets cache)."""
    import datasets.config
    import huggingface_hub.constants

    hub, prepared = tmp_path / "hub", tmp_path / "datasets"
    hub.mkdir()
    prepared.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", prepared)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the loaders read the caches only
    return hub, prepared


def cache_model(hub: Path, name: str, revision: str, tokenizer, seed: int = 0) -> torch.nn.Module:
    """Put a tiny model in ``hub`` as ``hf_hub_download`` does: files in ``blobs/<sha256>``,
    linked from ``snapshots/<revision>/``, and ``refs/main`` naming ``revision``."""
    model = tiny_causal_lm("gpt2", len(tokenizer), seed=seed)
    snapshot = hub / f"models--{name.replace('/', '--')}" / "snapshots" / revision
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    link_snapshot(snapshot)
    return model


def link_snapshot(snapshot: Path) -> None:
    """Lay out the files saved in ``snapshot`` (``<repo>/snapshots/<revision>``) as
    ``hf_hub_download`` does: in ``<repo>/blobs/<sha256>``, linked from the snapshot, and point
    ``<repo>/refs/main`` at it."""
    repo = snapshot.parent.parent
    (repo / "blobs").mkdir(exist_ok=True)
    for file in [f for f in snapshot.iterdir() if f.is_file()]:
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        file.replace(blob)
        file.symlink_to(os.path.relpath(blob, file.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(snapshot.name)


def prepare_dataset(cache: Path, name: str, revision: str, rows: list[dict]) -> None:
    """Put ``rows`` in ``cache`` as ``datasets.load_dataset(name)`` prepares a Hub dataset:
    ``owner___name/default/0.0.0/<revision>/`` with the Arrow file and ``dataset_info.json``,
    newer than the copies already there."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    owner, short = name.split("/")
    folder = cache / f"{owner}___{short}" / "default" / "0.0.0" / revision
    folder.mkdir(parents=True)
    table = datasets.Dataset.from_list(rows)
    with ArrowWriter(path=str(folder / f"{short}-train.arrow")) as writer:
        writer.write_table(table.data.table)
        writer.finalize()
    split = datasets.SplitInfo("train", num_examples=len(rows), dataset_name=short)
    datasets.DatasetInfo(
        config_name="default", dataset_name=short, features=table.features,
        splits=datasets.SplitDict({"train": split}),
    ).write_to_directory(str(folder))
    newest = time.time() + len(list(folder.parent.iterdir()))  # the copy the loader picks
    os.utime(folder, (newest, newest))


def logits(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(tokenizer(["The film was a delight."], return_tensors="pt").input_ids).logits


def spec_hash(**fields) -> str:
    return params_hash(ExperimentSpec(device="cpu", **fields).key())


def test_a_cached_hub_model_is_keyed_by_the_revision_it_loads(hf_cache, tokenizer):
    from huggingface_hub import hf_hub_download

    hub, _ = hf_cache
    cache_model(hub, "someone/tiny", REV_A, tokenizer)
    assert model_fingerprint("someone/tiny") == {"model_revision": REV_A}
    assert ExperimentSpec(model="someone/tiny", device="cpu").key()["model_revision"] == REV_A
    # the snapshot from_pretrained resolves offline is the one in the key
    config = hf_hub_download("someone/tiny", "config.json", local_files_only=True)
    assert Path(config).parent.name == REV_A
    cache_model(hub, "gpt2", REV_B, tokenizer)  # a name without an owner
    assert model_fingerprint("gpt2") == {"model_revision": REV_B}


def test_a_cached_hub_dataset_is_keyed_by_the_revision_it_loads(hf_cache):
    _, prepared = hf_cache
    prepare_dataset(prepared, "someone/prefs", REV_A, ROWS_A)
    assert dataset_fingerprint("someone/prefs") == {"dataset_revision": REV_A}
    assert ExperimentSpec(dataset="someone/prefs", device="cpu").key()["dataset_revision"] == REV_A
    assert load_pairs("someone/prefs") == [PreferencePair(**ROWS_A[0])]


def test_a_new_snapshot_makes_a_new_key(hf_cache, tokenizer):
    hub, prepared = hf_cache
    old = cache_model(hub, "someone/tiny", REV_A, tokenizer, seed=0)
    prepare_dataset(prepared, "someone/prefs", REV_A, ROWS_A)
    before = spec_hash(model="someone/tiny", dataset="someone/prefs")

    new = cache_model(hub, "someone/tiny", REV_B, tokenizer, seed=1)  # refs/main moves to B
    assert model_fingerprint("someone/tiny") == {"model_revision": REV_B}
    loaded = load_model("someone/tiny", device="cpu").model
    assert torch.equal(logits(loaded, tokenizer), logits(new, tokenizer))
    assert not torch.equal(logits(loaded, tokenizer), logits(old, tokenizer))
    after_model = spec_hash(model="someone/tiny", dataset="someone/prefs")
    assert after_model != before  # the old key would have returned the old weights' numbers

    prepare_dataset(prepared, "someone/prefs", REV_B, ROWS_B)  # a newer prepared copy
    assert dataset_fingerprint("someone/prefs") == {"dataset_revision": REV_B}
    assert load_pairs("someone/prefs") == [PreferencePair(**ROWS_B[0])]
    assert spec_hash(model="someone/tiny", dataset="someone/prefs") not in (before, after_model)


def test_a_name_not_in_the_cache_is_keyed_by_its_name_only(hf_cache, tokenizer):
    hub, _ = hf_cache
    # not cached, not a repo id (the loaders reject those), or a cache entry the loader
    # cannot use (no refs/main; refs/main naming a snapshot that is not there): no revision
    (hub / "models--someone--no-ref" / "snapshots" / REV_A).mkdir(parents=True)
    (hub / "models--someone--lost" / "refs").mkdir(parents=True)
    (hub / "models--someone--lost" / "refs" / "main").write_text(REV_A)
    names = ["someone/not-cached", "gpt2", "someone/no-ref", "someone/lost", "./nope", "a/b/c",
             "bad name!", "~/x", "pairs.jsonl"]
    for name in names:
        assert model_fingerprint(name) == {}, name
        assert dataset_fingerprint(name) == {}, name
    base = ExperimentSpec(model="someone/not-cached", dataset="someone/prefs", device="cpu").key()
    assert "model_revision" not in base and "dataset_revision" not in base
    # the same name once in the cache: keyed by its revision
    cache_model(hub, "someone/not-cached", REV_A, tokenizer)
    assert model_fingerprint("someone/not-cached") == {"model_revision": REV_A}


def test_builtin_names_and_local_paths_keep_their_keys(hf_cache, tokenizer, tmp_path, monkeypatch):
    hub, prepared = hf_cache
    # Hub repos of the same names are cached: the built-in names and local paths still win
    for name in ("smollm2-135m-instruct", "default", "tiny-llama", "tiny-gpt2", "someone/tiny"):
        cache_model(hub, name, REV_A, tokenizer)
    prepare_dataset(prepared, "someone/pairs", REV_A, ROWS_A)
    monkeypatch.chdir(tmp_path)
    local = Path("someone") / "tiny"  # a local folder that is also a cached repo id
    tiny_causal_lm("gpt2", len(tokenizer)).save_pretrained(local)
    data = Path("someone") / "pairs"  # a local data folder, likewise
    data.mkdir()
    (data / "train.jsonl").write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n')

    for name in ("smollm2-135m-instruct", "default", "tiny-llama", "tiny-gpt2"):
        assert model_fingerprint(name) == {}, name
    assert model_fingerprint(str(local)) == {
        "model_digest": content_digest(str(local), MODEL_FILES, recursive=False)
    }
    assert dataset_fingerprint("synthetic") == {}
    assert dataset_fingerprint(str(data)) == {"dataset_digest": content_digest(str(data))}
    # beside them, a Hub name in the same cache is keyed by its revision
    assert model_fingerprint("someone/other") == {}
    cache_model(hub, "someone/other", REV_B, tokenizer)
    assert model_fingerprint("someone/other") == {"model_revision": REV_B}


def test_online_a_cached_name_loads_the_revision_in_its_key(hf_cache, tokenizer, monkeypatch):
    """With the Hub reachable, a cached name is still loaded from its keyed snapshot (the Hub's
    newer revision would be computed under the old key); files the snapshot lacks are fetched at
    that revision. Every call the loaders make is recorded: (revision, offline)."""
    import datasets
    import huggingface_hub.constants
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import ge_utils.hub

    hub, prepared = hf_cache
    old = cache_model(hub, "someone/tiny", REV_A, tokenizer, seed=0)
    prepare_dataset(prepared, "someone/prefs", REV_A, ROWS_A)
    monkeypatch.setattr(ge_utils.hub, "hub_reachable", lambda timeout=3.0: True)
    calls: list[tuple[str | None, bool]] = []
    real_model, real_data = AutoModelForCausalLM.from_pretrained, datasets.load_dataset
    real_tokenizer = AutoTokenizer.from_pretrained

    def from_pretrained(name, *args, revision=None, **kwargs):
        calls.append((revision, huggingface_hub.constants.HF_HUB_OFFLINE))
        if not huggingface_hub.constants.HF_HUB_OFFLINE:
            return tiny_causal_lm("gpt2", len(tokenizer), seed=3)  # "the Hub": no network here
        return real_model(name, *args, revision=revision, **kwargs)

    def tokenizer_from(name, *args, **kwargs):
        if not huggingface_hub.constants.HF_HUB_OFFLINE:
            return tokenizer
        return real_tokenizer(name, *args, **kwargs)

    def load_dataset(name, *args, revision=None, **kwargs):
        calls.append((revision, datasets.config.HF_HUB_OFFLINE))
        if not datasets.config.HF_HUB_OFFLINE:
            return datasets.Dataset.from_list(ROWS_A)
        return real_data(name, *args, revision=revision, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", tokenizer_from)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)

    loaded = load_model("someone/tiny", device="cpu").model
    assert calls == [(REV_A, True)]  # from the cache, no request to the Hub
    assert torch.equal(logits(loaded, tokenizer), logits(old, tokenizer))
    calls.clear()
    assert load_pairs("someone/prefs") == [PreferencePair(**ROWS_A[0])]
    assert calls == [(None, True)]  # the newest prepared copy: the keyed one

    # the snapshot lost its weights: fetched online at the keyed revision, not main's newest
    weights = [f for f in (hub / "models--someone--tiny" / "snapshots" / REV_A).iterdir()
               if f.suffix == ".safetensors"]
    assert weights
    for f in weights:
        f.unlink()
    calls.clear()
    load_model("someone/tiny", device="cpu")
    assert calls == [(REV_A, True), (REV_A, False)]
    # the prepared copy is unreadable: downloaded again at its revision
    for f in (prepared / "someone___prefs").rglob("*.arrow"):
        f.unlink()
    calls.clear()
    assert load_pairs("someone/prefs") == [PreferencePair(**ROWS_A[0])]
    assert calls == [(None, True), (REV_A, False)]


def test_a_cached_hub_adapter_loads_on_its_cached_base(hf_cache, tokenizer):
    """A Hub adapter (adapter_config.json naming a Hub base model), both in the cache: it loads
    at its revision on the base's cached revision, and the key holds both revisions (a newer
    base snapshot changes the numbers, so it must change the key)."""
    from ge_utils.models import LoraSettings, add_lora

    hub, _ = hf_cache
    base = cache_model(hub, "someone/base", REV_B, tokenizer, seed=0)
    tuned = add_lora(base, LoraSettings(r=2, targets=("c_attn",)))
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_()
    snapshot = hub / "models--someone--adapter" / "snapshots" / REV_A
    tuned.save_pretrained(snapshot)
    config = snapshot / "adapter_config.json"
    config.write_text(json.dumps(
        json.loads(config.read_text()) | {"base_model_name_or_path": "someone/base"}))
    tokenizer.save_pretrained(snapshot)
    link_snapshot(snapshot)
    # the Hub answered 404 for its config.json when it was downloaded: huggingface_hub notes it
    no_config = snapshot.parent.parent / ".no_exist" / REV_A / "config.json"
    no_config.parent.mkdir(parents=True)
    no_config.touch()

    loaded = load_model("someone/adapter", device="cpu").model
    assert torch.equal(logits(loaded, tokenizer), logits(tuned, tokenizer))
    assert model_fingerprint("someone/adapter") == {
        "model_revision": REV_A, "base_model_revision": REV_B}
    local = hub.parent / "adapter-copy"  # the same adapter as a local folder
    shutil.copytree(snapshot, local)
    assert torch.equal(logits(load_model(str(local), device="cpu").model, tokenizer),
                       logits(tuned, tokenizer))
    assert model_fingerprint(str(local))["base_model_revision"] == REV_B
    before = spec_hash(model="someone/adapter")
    cache_model(hub, "someone/base", "c" * 40, tokenizer, seed=1)  # the base moves on
    assert model_fingerprint("someone/adapter")["base_model_revision"] == "c" * 40
    assert spec_hash(model="someone/adapter") != before
    for name in ("someone/adapter", str(local)):
        moved = load_model(name, device="cpu").model
        assert not torch.equal(logits(moved, tokenizer), logits(tuned, tokenizer))
    assert model_fingerprint(str(local))["base_model_revision"] == "c" * 40


def test_a_local_adapter_on_a_local_base_is_keyed_by_the_base_files(tmp_path, tokenizer):
    """An adapter folder whose ``base_model_name_or_path`` is a local folder: new weights saved
    in that base folder change the numbers the adapter gives, so they change the key."""
    from ge_utils.models import LoraSettings, add_lora

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base = tiny_causal_lm("gpt2", len(tokenizer), seed=0)
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    tuned = add_lora(base, LoraSettings(r=2, targets=("c_attn",)))
    tuned.save_pretrained(adapter_dir)
    config = adapter_dir / "adapter_config.json"
    config.write_text(json.dumps(
        json.loads(config.read_text()) | {"base_model_name_or_path": str(base_dir)}))
    tokenizer.save_pretrained(adapter_dir)

    before = model_fingerprint(str(adapter_dir))
    assert before["base_model_digest"] == content_digest(base_dir, MODEL_FILES, recursive=False)
    assert "base_model_revision" not in before
    key = spec_hash(model=str(adapter_dir))
    first = logits(load_model(str(adapter_dir), device="cpu").model, tokenizer)

    tiny_causal_lm("gpt2", len(tokenizer), seed=1).save_pretrained(base_dir)  # the base moves on
    assert model_fingerprint(str(adapter_dir))["base_model_digest"] != before["base_model_digest"]
    assert model_fingerprint(str(adapter_dir))["model_digest"] == before["model_digest"]
    assert spec_hash(model=str(adapter_dir)) != key
    moved = logits(load_model(str(adapter_dir), device="cpu").model, tokenizer)
    assert not torch.equal(moved, first)
