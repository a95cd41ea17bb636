"""Whether the Hugging Face hub can be reached, asked quickly and without retries.

``huggingface_hub`` retries a failed connection for about 20 s before it gives up; the model
and GGUF loaders ask this first, so that an offline machine gets its clear error at once.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for no hub access."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the hub endpoint (``HF_ENDPOINT``), honouring ``HF_HUB_OFFLINE``."""
    if hub_offline():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False
