"""Whether the Hugging Face hub can be reached, asked once before a hub name is read.

Offline (``HF_HUB_OFFLINE``) or unreachable, a hub name is read from the local cache only: an error in
seconds, not after a minute of retries.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

__all__ = ["reachable", "cached_model"]

TIMEOUT_S = 3.0


def reachable() -> bool:
    """False when ``HF_HUB_OFFLINE`` is set or the hub's host does not answer within `TIMEOUT_S`."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE"):
        return False
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=TIMEOUT_S).close()
    except OSError:
        return False
    return True


def cached_model(name: str) -> bool:
    """Whether the hub model ``name`` has its config in the local hub cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid hub id (a path, a name with spaces)
        return False
