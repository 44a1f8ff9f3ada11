"""The hub layout (radd_fast/hub.py): save_pretrained writes what the published class loads (each file
whole or absent, a full disk named), and push_to_hub uploads exactly that folder (a stand-in for the hub
client), offline."""
import errno
import json
import os

import pytest

from radd_fast import hub, load_model
from radd_fast.files import REPLACED, WriteError
from tests.support.checkpoints import TOKENS, D, check_parity, published_checkpoint, write_hub
from tests.support.faults import full_disk


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


def test_save_pretrained_on_a_full_disk_leaves_each_file_whole_or_absent(tmp_path, published, monkeypatch):
    """config.json through open, model.safetensors through safetensors' own writer: a full disk during
    either is one error naming the file, and no partial file or temporary is left."""
    cfg, state = published
    model, _ = load_model(write_hub(tmp_path / "a", cfg, state))
    with monkeypatch.context() as m:
        full_disk(m, tmp_path / "b")
        with pytest.raises(WriteError) as e:
            model.save_pretrained(tmp_path / "b")
    assert str(e.value) == f"no space left on device while writing {tmp_path / 'b' / 'config.json'}: {REPLACED}"
    assert list((tmp_path / "b").iterdir()) == []

    def half_written(state, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\x00" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(hub, "save_file", half_written)
    with pytest.raises(WriteError) as e:
        model.save_pretrained(tmp_path / "c")
    assert str(e.value) == f"no space left on device while writing {tmp_path / 'c' / 'model.safetensors'}: {REPLACED}"
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["config.json"]


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
