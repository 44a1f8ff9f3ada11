"""The hub layout (radd_fast/hub.py): save_pretrained writes what the published class loads, and
push_to_hub uploads exactly that folder (a stand-in for the hub client), offline."""
import json

import pytest

from radd_fast import load_model
from tests.support.checkpoints import TOKENS, D, check_parity, published_checkpoint, write_hub


@pytest.fixture
def published():
    """The 2-block, length-24 published checkpoint (config, state)."""
    return published_checkpoint()


def test_save_pretrained_round_trip_keeps_published_layout(tmp_path, published):
    cfg, state = published
    model, _ = load_model(write_hub(tmp_path / "a", cfg, state))
    model.save_pretrained(tmp_path / "b")
    written = json.loads((tmp_path / "b" / "config.json").read_text())
    assert written["tokens"] == TOKENS and written["model"]["hidden_size"] == D and written["training"]["ema"] == 0.9999
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "b" / "model.safetensors"))) == set(state)
    again, _ = load_model(tmp_path / "b")
    check_parity(again, state, lengths=(3,))


def test_push_to_hub_uploads_the_hub_layout(monkeypatch, tmp_path, published):
    cfg, state = published
    model, _ = load_model(write_hub(tmp_path / "hub", cfg, state))
    seen = {}

    class FakeApi:
        def __init__(self, token=None):
            seen["token"] = token

        def create_repo(self, repo_id, private=False, exist_ok=False):
            seen["repo"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path):
            from pathlib import Path

            seen["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            return f"https://hub.example/{repo_id}/commit/1"

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = model.push_to_hub("me/radd-tiny", private=True, token="t")
    assert url.endswith("/commit/1") and seen["repo"] == ("me/radd-tiny", True, True) and seen["token"] == "t"
    assert seen["files"] == ["config.json", "model.safetensors"]
