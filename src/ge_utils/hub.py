"""Fail fast when the Hugging Face Hub cannot be reached, instead of retrying for minutes; the
revision of a Hub model or dataset in the local cache, for cache keys (:mod:`ge_utils.spec`)."""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host resolves and accepts a connection (False when HF_HUB_OFFLINE)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def offline_error(kind: str, name: str) -> OSError:
    """The error for a Hub name that is neither cached nor reachable."""
    return OSError(
        f"{kind} {name!r} is not a local path, not in the Hugging Face cache, and the Hub cannot "
        "be reached (offline). Pass a local folder, or run once with network access to cache it."
    )


@contextmanager
def hub_offline_mode() -> Iterator[None]:
    """Switch huggingface_hub (and so transformers and datasets) to cache-only for a while.

    Setting ``HF_HUB_OFFLINE`` after import has no effect, and ``local_files_only=True`` alone
    still lets transformers probe the Hub (``adapter_config.json``: five retries, 23 s offline).
    """
    from unittest import mock

    import huggingface_hub.constants

    with mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True):
        yield


def _is_repo_id(name: str) -> bool:
    """Whether ``name`` is a valid Hub repo id (``name`` or ``owner/name``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def cached_model_revision(name: str) -> str | None:
    """The commit hash of the snapshot of Hub model ``name`` that ``from_pretrained(name)``
    reads from the local cache: ``refs/main`` of its folder in ``HF_HUB_CACHE``, resolved as
    ``huggingface_hub.hf_hub_download`` resolves it. ``None`` when ``name`` is not a repo id, or
    the repo (or that snapshot) is not cached."""
    snapshot = _cached_snapshot(name)
    return snapshot.name if snapshot is not None else None


def _cached_snapshot(name: str) -> Path | None:
    """The folder of the snapshot :func:`cached_model_revision` names, or ``None``."""
    if not _is_repo_id(name):
        return None
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    repo = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=name, repo_type="model")
    try:
        revision = (repo / "refs" / "main").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    snapshot = repo / "snapshots" / revision
    return snapshot if revision and snapshot.is_dir() else None


def adapter_base(name_or_path: str) -> str | None:
    """For a saved adapter (a local folder, or a cached Hub snapshot, with
    ``adapter_config.json`` and no ``config.json``: transformers loads it on the base model its
    config names), that base: a Hub name or a local path (``base_model_name_or_path``);
    ``None`` for anything else."""
    folder = Path(name_or_path) if Path(name_or_path).exists() else _cached_snapshot(name_or_path)
    if folder is None or not folder.is_dir() or (folder / "config.json").exists():
        return None
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return base if isinstance(base, str) and base else None


def adapter_base_revision(name_or_path: str) -> str | None:
    """For a saved adapter (:func:`adapter_base`), the cached revision of its base
    (:func:`cached_model_revision`); ``None`` for anything else, or a base that is a local path
    or not cached."""
    base = adapter_base(name_or_path)
    return cached_model_revision(base) if base is not None else None


def cached_dataset_revision(name: str) -> str | None:
    """The commit hash of Hub dataset ``name`` that ``datasets.load_dataset(name)`` reads from
    the local cache: the hash folder of its newest prepared copy in ``HF_DATASETS_CACHE``,
    picked by ``datasets``' own look-up. ``None`` when ``name`` is not a repo id, ``datasets`` is
    not installed, or no copy (or several configurations, which the loader refuses) is cached."""
    if not _is_repo_id(name):
        return None
    try:
        from datasets.packaged_modules.cache.cache import _find_hash_in_cache
    except ImportError:
        return None
    log = logging.getLogger("datasets.packaged_modules.cache.cache")
    level = log.level
    log.setLevel(logging.ERROR)  # its "Found the latest cached dataset" warning, once per key
    try:
        return _find_hash_in_cache(name, None, None, {}, None)[2]
    except (ValueError, OSError, KeyError):  # not cached, several configurations, no info file
        return None
    finally:
        log.setLevel(level)
