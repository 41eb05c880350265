"""The experiment spec: every field is in the cache key; notebooks build it in one call."""

import dataclasses

import pytest

import ge_utils.experiments as experiments
from ge_utils.models import LoraSettings
from ge_utils.spec import ExperimentSpec, spec_from_params
from ge_utils.training import TrainConfig, params_hash

# A value different from the default for every field (progress is the one field left out of the
# key, on purpose: a progress bar does not change a result).
SPEC_CHANGES = {
    "model": "tiny-gpt2",
    "dataset": "pairs.jsonl",
    "config": "single",
    "suffix": " my own words.",
    "n_train": 65,
    "n_eval": 17,
    "n_probe": 5,
    "seed": 1,
    "device": "cuda",
    "dtype": "bfloat16",
    "lora": LoraSettings(r=2),
    "train_last_k": 2,
    "sft": TrainConfig(steps=3, progress=False),
}
CONFIG_CHANGES = {
    "steps": 21,
    "batch_size": 9,
    "grad_accum": 2,
    "lr": 6e-6,
    "optimizer": "sgd",
    "weight_decay": 0.1,
    "warmup_steps": 1,
    "max_grad_norm": 1.0,
    "seed": 3,
    "template": "chat",
    "loss": "ipo",
    "loss_params": {"beta": 0.2},
    "eval_every": 4,
    "stats_method": "exact",
    "train_stats": True,
}


def test_every_spec_field_changes_the_cache_key():
    base = ExperimentSpec(device="cpu")  # "auto" is "cuda" on a GPU machine (tests/test_devices.py)
    names = {f.name for f in dataclasses.fields(ExperimentSpec)} - {"po"}
    assert names == set(SPEC_CHANGES), "a new spec field needs a test value here"
    for name, value in SPEC_CHANGES.items():
        changed = dataclasses.replace(base, **{name: value})
        assert params_hash(changed.key()) != params_hash(base.key()), name


def test_a_configuration_s_own_suffix_shares_its_key():
    own = ExperimentSpec(config="long", suffix=" sentiment based on my judgement.")
    assert own.suffix is None and own.key() == ExperimentSpec(config="long").key()
    other = ExperimentSpec(config="long", suffix=" sentiment.")
    assert params_hash(other.key()) != params_hash(ExperimentSpec(config="long").key())
    on_file = ExperimentSpec(dataset="pairs.jsonl", suffix=" sentiment based on my judgement.")
    assert on_file.suffix is not None


def test_every_train_config_field_changes_the_cache_key():
    base = ExperimentSpec(sft=TrainConfig(progress=False))
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"progress"}
    assert names == set(CONFIG_CHANGES), "a new TrainConfig field needs a test value here"
    for name, value in CONFIG_CHANGES.items():
        for phase in ("sft", "po"):
            cfg = dataclasses.replace(getattr(base, phase), **{name: value})
            changed = dataclasses.replace(base, **{phase: cfg})
            assert params_hash(changed.key()) != params_hash(base.key()), (phase, name)
    quiet = dataclasses.replace(base, po=dataclasses.replace(base.po, progress=False))
    assert params_hash(quiet.key()) == params_hash(base.key())
    for field in ("alpha", "dropout", "targets"):
        other = {"alpha": 128, "dropout": 0.05, "targets": ("q_proj",)}[field]
        a = dataclasses.replace(base, lora=LoraSettings(r=2))
        b = dataclasses.replace(base, lora=dataclasses.replace(LoraSettings(r=2), **{field: other}))
        assert params_hash(a.key()) != params_hash(b.key()), field


def test_recipe_arguments_enter_the_key():
    spec = ExperimentSpec()
    assert params_hash(spec.key(losses=["dpo"])) != params_hash(spec.key(losses=["ipo"]))


def test_spec_from_notebook_parameters():
    params = {
        "profile": "smoke", "model": "tiny-llama", "config": "long", "template": "none",
        "n_train": 32, "n_eval": 16, "n_probe": 4, "sft_steps": 20, "sft_lr": 3e-3, "steps": 20,
        "batch_size": 4, "lr": 1e-3, "beta": 0.2, "optimizer": "sgd", "eval_every": 5,
        "seed": 0, "seeds": [0, 1], "device": "cpu", "dtype": "float32", "lora_rank": 4,
        "lora_alpha": 128, "lora_targets": ["q_proj", "v_proj"], "suffix": " it is.",
    }
    spec = spec_from_params(params, train_stats=True)
    assert spec.sft is not None and (spec.sft.steps, spec.sft.lr, spec.sft.batch_size) == (
        20, 3e-3, 4
    )
    assert spec.po.loss_params == {"beta": 0.2} and spec.po.optimizer == "sgd"
    assert spec.po.train_stats and not spec.po.progress
    assert spec.lora is not None and (spec.lora.r, spec.lora.alpha) == (4, 128)
    assert spec.lora.targets == ("q_proj", "v_proj") and spec.suffix == " it is."
    seeded = spec.with_seed(7)
    assert (seeded.seed, seeded.sft.seed, seeded.po.seed) == (7, 7, 7)
    assert spec_from_params({**params, "sft_steps": 0}).sft is None
    with pytest.raises(ValueError, match="n_probe"):
        spec_from_params({**params, "n_probe": 20})
    with pytest.raises(ValueError, match="suffix"):
        spec_from_params({**params, "suffix": 3})


def test_over_seeds_and_pair_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("GE_UTILS_CACHE", str(tmp_path))
    spec = ExperimentSpec(
        sft=TrainConfig(steps=2, batch_size=4, lr=1e-3, progress=False),
        po=TrainConfig(steps=2, batch_size=4, lr=1e-3, eval_every=2, progress=False),
        n_train=8, n_eval=3, n_probe=1, device="cpu",
    )
    runs = experiments.over_seeds(experiments.sft_then_preference, spec, [0, 1])
    assert {s: r.spec.seed for s, r in runs.items()} == {0: 0, 1: 1}
    changes = experiments.pair_changes({s: r.run for s, r in runs.items()})
    assert len(changes) == 6 and set(changes["seed"]) == {0, 1}
    one = runs[0].run.pairs.query("split == 'eval' and pair == 0").sort_values("step")
    d = one["logp_chosen"].iloc[-1] - one["logp_chosen"].iloc[0]
    assert changes.query("seed == 0 and pair == 0")["d_chosen"].iloc[0] == pytest.approx(d)
    with pytest.raises(ValueError, match="repeat"):
        experiments.over_seeds(experiments.sft_then_preference, spec, [0, 0])


def test_lora_rank_after_a_full_parameter_run_retrains(tmp_path, monkeypatch):
    """The stale-cache defect: `-p lora_rank 2` after a full run returned the full run."""
    monkeypatch.setenv("GE_UTILS_CACHE", str(tmp_path))
    calls = []
    real = experiments.preference_optimization

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(experiments, "preference_optimization", counting)
    params = {"model": "tiny-llama", "n_train": 8, "n_eval": 2, "n_probe": 1, "sft_steps": 1,
              "sft_lr": 1e-3, "steps": 1, "batch_size": 4, "lr": 1e-3, "eval_every": 1,
              "device": "cpu"}
    full = experiments.sft_then_preference(spec_from_params(params))
    lora = experiments.sft_then_preference(spec_from_params(params, lora_rank=2))
    experiments.sft_then_preference(spec_from_params(params, lora_rank=2))
    assert len(calls) == 2  # the LoRA run trained, its rerun came from the cache
    assert lora.spec.lora is not None and full.spec.lora is None


def _write_pairs(path, pairs):
    import json

    path.write_text(
        "".join(
            json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
            for p in pairs
        )
    )


def test_a_data_file_s_content_is_in_the_key(tmp_path):
    from ge_utils.data import PreferencePair, sentiment_pairs

    train, held = sentiment_pairs(4, 2, "long")
    pairs = train + held
    data = tmp_path / "my.jsonl"
    _write_pairs(data, pairs)
    spec = ExperimentSpec(dataset=str(data), n_train=4, n_eval=2, n_probe=1, device="cpu")
    first = params_hash(spec.key())
    _write_pairs(data, [PreferencePair(p.prompt, p.rejected, p.chosen) for p in pairs])
    assert params_hash(spec.key()) != first  # chosen and rejected swapped: a new key
    _write_pairs(data, pairs)
    assert params_hash(spec.key()) == first  # the same content at the same path: the same key


def test_a_local_model_folder_s_content_is_in_the_key(tiny_llama_folder):
    import torch

    from ge_utils.boundary import Cell, GridSetup, cell_params
    from ge_utils.predict import PredictionSetup, _cache_key

    loaded, folder = tiny_llama_folder

    spec = ExperimentSpec(model=str(folder), device="cpu")
    setup = PredictionSetup(model=str(folder), device="cpu")
    grid = GridSetup(model=str(folder), device="cpu")

    def keys() -> tuple[str, str, str]:
        return (params_hash(spec.key()), params_hash(_cache_key("scores", setup, [])),
                params_hash(cell_params(Cell(), grid, 0, False)))

    first = keys()
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.mul_(0.5)
    loaded.model.save_pretrained(folder)  # new weights, same path, same file sizes
    second = keys()
    assert all(b != a for a, b in zip(first, second, strict=True))
    loaded.model.save_pretrained(folder)  # the same weights saved again: the same key
    assert keys() == second


@pytest.mark.parametrize(
    "model", ["tiny-llama", "tiny-gpt2", "smollm2-135m-instruct", "default", "gpt2",
              "mistralai/Mistral-7B-Instruct-v0.3"],
)  # fmt: skip
def test_built_in_and_hub_names_are_keyed_by_name_alone(model, tmp_path, monkeypatch):
    from ge_utils.predict import PredictionSetup, _cache_key

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-llama").mkdir()  # a built-in name wins over a folder of that name
    (tmp_path / "tiny-llama" / "config.json").write_text("{}")
    for dataset in ("synthetic", "trl-lib/tldr-preference"):
        key = ExperimentSpec(model=model, dataset=dataset, device="cpu").key()
        assert not {"model_digest", "dataset_digest"} & set(key)
        assert key["model"] == model and key["dataset"] == dataset
    assert "model_digest" not in _cache_key("scores", PredictionSetup(model=model), [])
