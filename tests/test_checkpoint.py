"""Loading and saving in every layout, and every error path, offline."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import radd_fast
from radd_fast import RADD, CheckpointError, ExponentialMovingAverage, LogLinearNoise, load_model
from tests.helpers import assert_close
from tests.independent_radd import published_config, published_log_probs, published_logits, published_state_dict

TOKENS, D, H, BLOCKS, LENGTH = 29, 32, 2, 2, 24


@pytest.fixture
def published():
    return published_config(TOKENS, D, H, BLOCKS, LENGTH), published_state_dict(TOKENS + 1, D, H, BLOCKS, seed=7)


def _write_hub(folder, cfg, state, fmt="safetensors"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    if fmt == "safetensors":
        save_file(state, str(folder / "model.safetensors"))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    return folder


def _check_parity(model, state, lengths=(1, 5, LENGTH)):
    for T in lengths:
        x = torch.randint(0, TOKENS + 1, (2, T))
        with torch.no_grad():
            assert_close(model.logits(x), published_logits(state, H, x), atol=1e-5, rtol=1e-5, name=f"logits T={T}")
            assert_close(model(x), published_log_probs(state, H, x), atol=1e-5, rtol=1e-5, name=f"forward T={T}")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hub_folder_loads_with_parity(tmp_path, published, fmt):
    cfg, state = published
    model, noise = load_model(_write_hub(tmp_path / "hub", cfg, state, fmt))
    assert isinstance(noise, LogLinearNoise) and not model.training
    _check_parity(model, state)


def test_save_pretrained_round_trip_keeps_published_layout(tmp_path, published):
    cfg, state = published
    model, _ = load_model(_write_hub(tmp_path / "a", cfg, state))
    model.save_pretrained(tmp_path / "b")
    written = json.loads((tmp_path / "b" / "config.json").read_text())
    assert written["tokens"] == TOKENS and written["model"]["hidden_size"] == D and written["training"]["ema"] == 0.9999
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "b" / "model.safetensors"))) == set(state)
    again, _ = load_model(tmp_path / "b")
    _check_parity(again, state, lengths=(3,))


def _write_run(folder, cfg, model_state, ema_state):
    import yaml

    (folder / ".hydra").mkdir(parents=True)
    (folder / "checkpoints-meta").mkdir()
    # Hydra interpolations that only Hydra resolves must not break loading.
    cfg = dict(cfg, work_dir="${hydra:run.dir}")
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    torch.save({"model": model_state, "ema": ema_state, "optimizer": {}, "step": 10},
               folder / "checkpoints-meta" / "checkpoint.pth")
    return folder


def test_run_folder_serves_ema_weights(tmp_path, published):
    cfg, ema_weights = published
    raw = RADD(cfg)
    raw_state = {f"module.{k}": v for k, v in raw.state_dict().items()}  # as a DDP run saves it
    target = RADD(cfg)
    target.load_state_dict(ema_weights)
    ema = ExponentialMovingAverage(target.parameters(), decay=0.9999)
    model, _ = load_model(_write_run(tmp_path / "run", cfg, raw_state, ema.state_dict()))
    _check_parity(model, ema_weights, lengths=(4,))


def test_backend_and_dtype_arguments(tmp_path, published):
    cfg, state = published
    model, _ = load_model(_write_hub(tmp_path / "hub", cfg, state), backend="reference", dtype="bf16")
    assert model.backend == "reference" and model.compute_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown backend"):
        load_model(tmp_path / "hub", backend="turbo")


def test_error_missing_folder_and_files(tmp_path, published):
    cfg, state = published
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no weights"):
        load_model(tmp_path / "noweights")
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("tokens: 3\n")
    with pytest.raises(CheckpointError, match="missing checkpoints-meta"):
        load_model(run)


def test_error_missing_unexpected_and_shape(tmp_path, published):
    cfg, state = published
    missing = {k: v for k, v in state.items() if k != "blocks.1.attn_out.weight"}
    with pytest.raises(CheckpointError, match=r"missing keys \['blocks.1.attn_out.weight'\]"):
        load_model(_write_hub(tmp_path / "m", cfg, missing))
    extra = dict(state, **{"blocks.0.adaLN_modulation.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="unexpected keys.*adaLN"):
        load_model(_write_hub(tmp_path / "u", cfg, extra))
    bad = dict(state, **{"blocks.0.mlp.0.bias": torch.zeros(5)})
    with pytest.raises(CheckpointError, match=r"blocks.0.mlp.0.bias: expected \(128,\), found \(5,\)"):
        load_model(_write_hub(tmp_path / "s", cfg, bad))


def test_error_vocab_mismatch(tmp_path, published):
    cfg, state = published
    cfg = dict(cfg, tokens=TOKENS + 5)
    with pytest.raises(CheckpointError, match="vocab mismatch"):
        load_model(_write_hub(tmp_path / "v", cfg, state))


def test_pickles_cannot_execute_code(tmp_path, published):
    cfg, _ = published

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    torch.save({"x": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_model(folder)
    assert not (tmp_path / "pwned").exists()


def test_hub_id_resolution_is_offline_safe(monkeypatch, tmp_path, published):
    cfg, state = published
    hub = _write_hub(tmp_path / "cache", cfg, state)
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns, local_files_only=False):
        calls.append((repo_id, tuple(allow_patterns), local_files_only))
        return str(hub)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model, _ = load_model("someone/radd-tiny")
    assert calls == [("someone/radd-tiny", ("config.json", "model.safetensors", "pytorch_model.bin"), True)]  # cache
    _check_parity(model, state, lengths=(2,))


def test_hub_id_not_cached_fails_at_once_offline(monkeypatch):
    """Not in the cache and HF_HUB_OFFLINE set: one clear error, and no fetch (no 25-50 s of retries)."""
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns, local_files_only=False):
        calls.append(local_files_only)
        raise OSError("not in the cache")

    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(CheckpointError, match="'someone/radd-tiny' is not in the local Hugging Face cache and "
                                              "HF_HUB_OFFLINE is set; pass a local checkpoint folder"):
        load_model("someone/radd-tiny")
    assert calls == [True]


def test_ema_names_come_from_a_meta_model(monkeypatch, published):
    """ema_state_dict reads parameter names from a model built on the meta device (no memory)."""
    from radd_fast import checkpoint

    cfg, state = published
    built = []
    real = checkpoint.RADD

    def recording(config):
        model = real(config)
        built.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(checkpoint, "RADD", recording)
    config = radd_fast.RADDConfig.from_dict(cfg)
    names, shadow = zip(*[(n, torch.full(p.shape, 0.5)) for n, p in real(config).named_parameters()])
    merged = checkpoint.ema_state_dict(config, state, {"shadow_params": shadow})
    assert built == ["meta"] and all(torch.equal(merged[n], s) for n, s in zip(names, shadow))


@pytest.mark.hub
@pytest.mark.skipif(os.environ.get("RADD_HUB_TESTS") != "1", reason="set RADD_HUB_TESTS=1 to download the published weights")
def test_published_hub_weights(monkeypatch):  # pragma: no cover - network
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from transformers import AutoTokenizer

    model, _ = radd_fast.load_model("JingyangOu/radd-t-dce")
    tok = AutoTokenizer.from_pretrained("gpt2")
    ids = torch.tensor([tok.encode("The capital of France is Paris, and the capital of Italy is Rome.")])
    with torch.no_grad():
        logp = model(ids)
    assert_close(logp[..., :-1].exp().sum(-1), torch.ones(ids.shape), atol=1e-4, name="normalised")
    masked = ids.clone()
    masked[0, 5] = model.mask_id  # "Paris"
    with torch.no_grad():
        top = model(masked)[0, 5, :-1].topk(20).indices.tolist()
    assert ids[0, 5].item() in top, f"'{tok.decode(ids[0, 5])}' not among the top-20 {tok.decode(top)}"


def test_push_to_hub_uploads_the_hub_layout(monkeypatch, tmp_path, published):
    cfg, state = published
    model, _ = load_model(_write_hub(tmp_path / "hub", cfg, state))
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
