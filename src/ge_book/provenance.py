"""Provenance records: what produced a result (profile, parameters, device, versions, commit)."""

from __future__ import annotations

import datetime as dt
import hashlib
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch
import transformers

import ge_utils
from ge_utils.claims import INTERVALS
from ge_utils.models import resolve_device


def device_description(device: str = "auto") -> str:
    """Human-readable device, e.g. ``'cpu (2 threads)'`` or ``'cuda (NVIDIA H100 80GB HBM3)'``.

    A device this machine does not have is described as such (the run then fails on it).
    """
    try:
        resolved = resolve_device(device)
    except ValueError:
        return f"{device} (not available here)"
    if resolved.type == "cuda":
        return f"{resolved} ({torch.cuda.get_device_name(resolved)})"
    n = torch.get_num_threads()
    return f"{resolved} ({n} thread{'' if n == 1 else 's'}, {platform.machine()})"


def machine_fingerprint() -> str:
    """One line naming what decides the last bits of this machine's CPU arithmetic: the CPU
    (vendor, model, a hash of its feature flags, from ``/proc/cpuinfo`` where there is one), the
    number of torch threads and torch's version. A short training run amplifies those bits into
    different numbers, so outputs stored on one machine are only compared number for number on a
    machine with the same fingerprint (``scripts/test.sh``)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    cpu = " ".join(
        v for v in (fields.get("vendor_id"), fields.get("model name") or platform.processor()) if v
    )
    flags = hashlib.sha256(fields.get("flags", "").encode()).hexdigest()[:12]
    n = torch.get_num_threads()
    return (
        f"{platform.machine()} {cpu or 'unknown CPU'} (flags {flags}), {n} torch thread"
        f"{'' if n == 1 else 's'}, torch {torch.__version__}"
    )


def git_commit(repo: Path | None = None) -> str:
    """Commit hash of the repository (``+dirty`` when tracked files changed), or ``'unknown'``."""
    cwd = repo or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def provenance_record(
    profile: str, parameters: dict[str, Any], device: str = "auto", repo: Path | None = None
) -> dict[str, Any]:
    """Everything but the wall time, which the caller adds when the run ends."""
    return {
        "profile": profile,
        "parameters": dict(parameters),
        "device": device_description(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ge_utils": ge_utils.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(repo),
        "intervals": INTERVALS,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }


def provenance_markdown(record: dict[str, Any]) -> str:
    """A compact Markdown block for the top of a rendered notebook."""
    params = ", ".join(f"`{k}={v!r}`" for k, v in sorted(record["parameters"].items()))
    warn = ""
    if record["profile"] == "smoke":
        warn = (
            "\n\n**Smoke profile:** a seconds-long check of the pipeline on a tiny model; "
            "its numbers are not results."
        )
    wall = record.get("wall_time_s")
    wall_text = f"{wall:.1f} s" if isinstance(wall, int | float) else "n/a"
    return (
        "```{admonition} Provenance of this page\n"
        ":class: note\n\n"
        f"| | |\n|---|---|\n"
        f"| profile | **{record['profile']}** |\n"
        f"| device | {record['device']} |\n"
        f"| wall time | {wall_text} |\n"
        f"| date | {record['date']} |\n"
        f"| git commit | `{record['git_commit']}` |\n"
        f"| versions | torch {record['torch']}, transformers {record['transformers']}, "
        f"ge_utils {record['ge_utils']}, Python {record['python']} |\n\n"
        f"Parameters: {params}{warn}\n"
        "```"
    )
