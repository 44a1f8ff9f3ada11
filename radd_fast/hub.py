"""The hub layout on disk and the Hugging Face hub: writing it, uploading it, and failing fast offline.

The hub layout is a folder with ``config.json`` (the run config, nested, as the
published uploads carry it, plus ``model_type: radd`` for ``transformers``' Auto
classes) and ``model.safetensors`` (older uploads:
``pytorch_model.bin``). ``checkpoint.py`` reads it; this module writes it. It
knows nothing of the model class: it takes anything with ``config.to_dict()`` and
``state_dict()``, so the model can call it without an import circle.

``hub_unreachable_hint`` lets a caller that is about to fetch a hub name say in
one line what to pass instead, rather than letting the hub client spend
25-50 s in retries when there is no network.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from safetensors.torch import save_file

from .files import atomic_save_as, atomic_write_text

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
BIN_NAME = "pytorch_model.bin"
DEFAULT_ENDPOINT = "https://huggingface.co"
# One TCP connect is enough to tell "no network" from "slow network".
PROBE_TIMEOUT_S = 3.0
# The model type transformers' AutoConfig reads from config.json (radd_fast/integrations/transformers.py registers
# it); the published class ignores the extra key. The published uploads have none.
MODEL_TYPE = "radd"


def save_pretrained(model, folder) -> None:
    """Write the hub layout (config.json + model.safetensors, fp32) that the published class loads too,
    and ``transformers.AutoModelForMaskedLM`` after ``import radd_fast`` (config.json names ``model_type``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {**model.config.to_dict(), "model_type": MODEL_TYPE}
    atomic_write_text(folder / CONFIG_NAME, json.dumps(config, indent=2))  # each file whole, or as it was
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_save_as(folder / SAFETENSORS_NAME, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))


def push_to_hub(model, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload the hub layout of ``model`` to ``repo_id``; returns the commit URL."""
    from huggingface_hub import HfApi  # lazy: the hub client is only needed when uploading

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        return str(api.upload_folder(repo_id=repo_id, folder_path=tmp))


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to a true value (the hub client then never connects)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One TCP connect to the hub endpoint (``HF_ENDPOINT`` or huggingface.co), bounded by ``timeout``."""
    url = urlparse(os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT))
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_unreachable_hint(what: str, instead: str) -> str | None:
    """None when ``what`` may be fetched now; else one line saying why not and what to pass ``instead``.

    Call it after a cache-only lookup failed: offline mode or no route to the hub means a fetch
    would only retry and fail.
    """
    if hub_offline():
        return f"{what} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {instead}"
    if not hub_reachable():
        return (f"{what} is not in the local Hugging Face cache and the hub cannot be reached (no network?); "
                f"{instead}, or set HF_HUB_OFFLINE=1 to fail at once")
    return None
