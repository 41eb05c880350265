"""Fail fast when the Hugging Face Hub cannot be reached, instead of retrying for minutes."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
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
