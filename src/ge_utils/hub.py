"""Fail fast when the Hugging Face Hub cannot be reached, instead of retrying for minutes."""

from __future__ import annotations

import os
import socket
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
