"""Devices in cache keys: ``auto`` is keyed by the kind of device it resolves to on this
machine, so a result computed on a GPU is never read back by a CPU run, and the reverse; a CPU
key also holds torch's thread count, so a run on two threads never reads back one on one."""

import time
from dataclasses import replace

import pytest
import torch

import ge_utils.boundary as boundary
from ge_utils.models import device_clock, device_key, device_kind
from ge_utils.predict import PredictionSetup, _cache_key
from ge_utils.spec import ExperimentSpec
from ge_utils.training import params_hash


@pytest.fixture
def gpu_machine(monkeypatch):
    """This process as seen on a machine with CUDA (nothing runs on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_device_kind():
    assert device_kind("cpu") == "cpu" and device_kind("cuda:1") == "cuda"
    assert device_kind("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu'; expected cpu, cuda"):
        device_kind("gpu")


def test_device_kind_of_auto_on_a_gpu_machine(gpu_machine):
    assert device_kind("auto") == "cuda" and device_kind("cpu") == "cpu"


def _sweep_key(device: str, monkeypatch) -> dict:
    seen = {}

    def capture(folder, params, run):
        seen.update(params)
        return {"sweep": None}

    monkeypatch.setattr(boundary, "cached_run", capture)
    boundary.suffix_length_sweep("tiny-llama", None, [0, 1], device=device)
    return seen


def _keys(device: str, monkeypatch) -> list[str]:
    """The cache keys of every keyed computation that takes a device, for ``device``."""
    spec = ExperimentSpec(device=device)
    setup = PredictionSetup("tiny-llama", device=device)
    cell = boundary.Cell()
    grid = boundary.GridSetup(device=device)
    return [
        params_hash(spec.key()),
        params_hash(_cache_key("scores", setup, [])),
        params_hash(boundary.cell_params(cell, grid, seed=0, trace=False)),
        params_hash(_sweep_key(device, monkeypatch)),
    ]


def test_auto_shares_the_key_of_the_cpu_here(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    auto, cpu, cuda = (_keys(d, monkeypatch) for d in ("auto", "cpu", "cuda"))
    assert auto == cpu
    assert all(a != c for a, c in zip(auto, cuda, strict=True))


def test_auto_shares_the_key_of_cuda_on_a_gpu_machine(gpu_machine, monkeypatch):
    auto, cpu, cuda = (_keys(d, monkeypatch) for d in ("auto", "cpu", "cuda:0"))
    assert auto == cuda
    assert all(a != c for a, c in zip(auto, cpu, strict=True))


def test_the_device_is_the_only_change(monkeypatch):
    """The keys differ in the device alone: the rest of a spec keys as before."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    spec = ExperimentSpec(seed=3)
    key = spec.key()
    assert key["device"] == "cpu" and key["threads"] == torch.get_num_threads()
    device = {"device", "threads"}
    assert {k: v for k, v in replace(spec, device="cuda").key().items() if k not in device} == {
        k: v for k, v in key.items() if k not in device
    }


@pytest.fixture
def threads():
    """Set torch's CPU thread count within a test; restored after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_the_cpu_thread_count_is_in_every_cpu_key(threads, monkeypatch):
    """Training on one and on two threads gives different numbers: each keyed computation on
    the CPU gets another key; one on CUDA does not depend on the CPU's threads."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    threads(1)
    one, cuda_one = _keys("cpu", monkeypatch), _keys("cuda", monkeypatch)
    assert device_key("cpu") == {"device": "cpu", "threads": 1}
    threads(2)
    two, cuda_two = _keys("cpu", monkeypatch), _keys("cuda", monkeypatch)
    assert device_key("cpu") == {"device": "cpu", "threads": 2}
    assert device_key("cuda:1") == {"device": "cuda"}
    assert all(a != b for a, b in zip(one, two, strict=True))
    assert cuda_one == cuda_two


def test_device_clock_waits_for_a_gpu_only(monkeypatch):
    """A clock read on a CUDA device first waits for its queued kernels; on the CPU it reads
    at once."""
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    before = time.perf_counter()
    assert device_clock("cpu") >= before and waited == []
    assert device_clock(torch.device("cuda", 1)) >= before
    assert waited == [torch.device("cuda", 1)]
