"""load_model: every layout (hub folder, run folder, hub id), the EMA weights it serves, every user
error (most compared whole: the message is the contract of a user error, docs/MODEL.md, STYLE.md
"User errors": the file named, one line, the library error wrapped), the device checks, and the
safety and portability settings of the file reads, offline.
"""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import radd_fast
from radd_fast import RADD, CheckpointError, ExponentialMovingAverage, LogLinearNoise, load_model
from radd_fast import checkpoint as ckpt_mod
from radd_fast.config import ConfigError, RADDConfig
from radd_fast.training import state as training_state
from tests.support.checkpoints import (
    TOKENS,
    D,
    H,
    check_parity,
    flip_bytes,
    published_checkpoint,
    write_hub,
    write_run_folder,
)
from tests.support.compare import assert_close
from tests.support.published_model import published_config, published_state_dict

SMALL_BLOCKS, SMALL_LENGTH = 1, 8
PATTERNS = ("config.json", "model.safetensors", "pytorch_model.bin")


@pytest.fixture
def published():
    """The 2-block, length-24 published checkpoint (config, state): the parity checks'."""
    return published_checkpoint()


@pytest.fixture
def small_published():
    """A 1-block, length-8 published checkpoint (config, state), weights drawn with seed 3."""
    return (published_config(TOKENS, D, H, SMALL_BLOCKS, SMALL_LENGTH),
            published_state_dict(TOKENS + 1, D, H, SMALL_BLOCKS, seed=3))


# ---------------------------------------------------------------------------- layouts and parity
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hub_folder_loads_with_parity(tmp_path, published, fmt):
    cfg, state = published
    model, noise = load_model(write_hub(tmp_path / "hub", cfg, state, fmt))
    assert isinstance(noise, LogLinearNoise) and not model.training
    check_parity(model, state)


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
    check_parity(model, ema_weights, lengths=(4,))


def test_backend_and_dtype_arguments(tmp_path, published):
    cfg, state = published
    model, _ = load_model(write_hub(tmp_path / "hub", cfg, state), backend="reference", dtype="bf16")
    assert model.backend == "reference" and model.compute_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown backend"):
        load_model(tmp_path / "hub", backend="turbo")


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


# ---------------------------------------------------------------------------- errors, by fragment
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
        load_model(write_hub(tmp_path / "m", cfg, missing))
    extra = dict(state, **{"blocks.0.adaLN_modulation.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="unexpected keys.*adaLN"):
        load_model(write_hub(tmp_path / "u", cfg, extra))
    bad = dict(state, **{"blocks.0.mlp.0.bias": torch.zeros(5)})
    with pytest.raises(CheckpointError, match=r"blocks.0.mlp.0.bias: expected \(128,\), found \(5,\)"):
        load_model(write_hub(tmp_path / "s", cfg, bad))


def test_error_vocab_mismatch(tmp_path, published):
    cfg, state = published
    cfg = dict(cfg, tokens=TOKENS + 5)
    with pytest.raises(CheckpointError, match="vocab mismatch"):
        load_model(write_hub(tmp_path / "v", cfg, state))


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


# ---------------------------------------------------------------------------- hub ids
def test_hub_id_resolution_is_offline_safe(monkeypatch, tmp_path, published):
    cfg, state = published
    hub = write_hub(tmp_path / "cache", cfg, state)
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns, local_files_only=False):
        calls.append((repo_id, tuple(allow_patterns), local_files_only))
        return str(hub)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model, _ = load_model("someone/radd-tiny")
    assert calls == [("someone/radd-tiny", ("config.json", "model.safetensors", "pytorch_model.bin"), True)]  # cache
    check_parity(model, state, lengths=(2,))


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


# ============================================================================ every user error, word for word
def _message(excinfo) -> str:
    return str(excinfo.value)


def _hub(folder: Path, cfg, state=None, weights_bytes: bytes | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    if state is not None:
        save_file(state, str(folder / "model.safetensors"))
    if weights_bytes is not None:
        (folder / "model.safetensors").write_bytes(weights_bytes)
    return folder


def _run(folder: Path, config_text: str, checkpoint=None) -> tuple[Path, Path]:
    """A run folder with ``config_text`` as its config and ``checkpoint`` saved (or 3 junk bytes)."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / "checkpoints-meta").mkdir()
    (folder / ".hydra" / "config.yaml").write_text(config_text, encoding="utf-8")
    path = folder / "checkpoints-meta" / "checkpoint.pth"
    if checkpoint is None:
        path.write_bytes(b"abc")
    else:
        torch.save(checkpoint, path)
    return folder / ".hydra" / "config.yaml", path


# ---------------------------------------------------------------------------- the argument itself
@pytest.mark.parametrize("arg", ["", "   ", None])
def test_an_empty_argument_is_refused(arg):
    with pytest.raises(CheckpointError) as e:
        load_model(arg)
    assert _message(e) == f"load_model needs a hub repo id or a checkpoint folder, got {arg!r}"


def test_a_file_is_not_a_folder(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"x")
    with pytest.raises(CheckpointError) as e:
        load_model(file)
    assert _message(e) == f"{file} is a file; pass the folder that holds config.json and the weights"


@pytest.mark.parametrize("text", ["./radd-no-such-folder", "/radd-no-such-folder", "~/radd-no-such-folder",
                                  "a/b/radd-no-such-folder"])
def test_paths_that_look_local_never_reach_the_hub(monkeypatch, tmp_path, text):
    """Starting with '.', '/' or '~', or not of the form owner/name: a local path, named in the error."""
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    with pytest.raises(CheckpointError) as e:
        load_model(text)
    assert _message(e) == f"no such checkpoint folder: {Path(text).expanduser()}"


# ---------------------------------------------------------------------------- devices
def test_device_errors(monkeypatch):
    with pytest.raises(ConfigError) as e:
        ckpt_mod.check_device("gpu0")
    assert _message(e) == "unknown device 'gpu0'; expected cpu, cuda or cuda:N"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as e:
        ckpt_mod.check_device("cuda")
    assert _message(e) == (f"device 'cuda' asked for, but CUDA is not available here "
                           f"(torch {torch.__version__}, no visible GPU); use cpu")
    assert ckpt_mod.check_device("cpu") == torch.device("cpu")


def test_device_index_is_checked_against_the_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert ckpt_mod.check_device("cuda") == torch.device("cuda")  # no index: the current GPU
    assert ckpt_mod.check_device("cuda:1") == torch.device("cuda", 1)  # the last visible one
    with pytest.raises(ConfigError) as e:
        ckpt_mod.check_device("cuda:2")
    assert _message(e) == "device 'cuda:2' asked for, but only 2 GPU(s) are visible"


# ---------------------------------------------------------------------------- the hub
def test_hub_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import` raises ImportError
    with pytest.raises(CheckpointError) as e:
        load_model("someone/radd-tiny")
    assert _message(e) == "loading from the hub needs huggingface_hub (pip install huggingface_hub)"


def _fake_hub(monkeypatch, second):
    """snapshot_download not cached (the first, local-only call fails); ``second`` answers the fetch."""
    import huggingface_hub

    calls = []

    def fake(repo_id, allow_patterns, local_files_only=False):
        calls.append((repo_id, tuple(allow_patterns), local_files_only))
        if local_files_only:
            raise OSError("not in the cache")
        return second()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setattr(ckpt_mod, "hub_unreachable_hint", lambda *args: None)  # "the hub is reachable"
    return calls


def test_hub_fetch_after_a_cache_miss(monkeypatch, tmp_path, small_published):
    cfg, state = small_published
    hub = _hub(tmp_path / "fetched", cfg, state)
    calls = _fake_hub(monkeypatch, lambda: str(hub))
    model, _ = load_model("someone/radd-tiny")
    assert calls == [("someone/radd-tiny", PATTERNS, True), ("someone/radd-tiny", PATTERNS, False)]
    assert torch.equal(model.state_dict()["vocab_embed.embedding"], state["vocab_embed.embedding"])


def test_hub_fetch_failure_names_the_repo(monkeypatch):
    def refuse():
        raise OSError("403 Forbidden")

    _fake_hub(monkeypatch, refuse)
    with pytest.raises(CheckpointError) as e:
        load_model("someone/radd-tiny")
    assert _message(e) == "could not fetch 'someone/radd-tiny' from the Hugging Face hub: 403 Forbidden"


# ---------------------------------------------------------------------------- hub folder contents
def test_hub_config_errors_name_the_file(tmp_path, small_published):
    folder = tmp_path / "hub"
    folder.mkdir()
    config = folder / "config.json"
    config.write_text("[1, 2]")
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert _message(e) == f"{config} holds a list, not a config mapping"
    config.write_text('{"a": 1}')
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert _message(e) == f"{config}: config has no 'tokens' or 'model' section (keys: ['a']); is this a RADD config?"
    config.write_text('{\n  "a": }')
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert _message(e) == f"{config} is not valid JSON (Expecting value at line 2, column 8)"
    config.write_bytes(b'\xff\xfe{"tokens": 3}')
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert _message(e) == f"{config} is not a text file (not UTF-8); expected the model config as JSON"


def test_weights_files_empty_or_corrupt(tmp_path, small_published):
    cfg, _ = small_published
    folder = _hub(tmp_path / "hub", cfg, weights_bytes=b"")
    weights = folder / "model.safetensors"
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert _message(e) == f"{weights} is empty (0 bytes; an interrupted write or copy?)"
    weights.write_bytes(b"x")  # one byte: not empty, but no safetensors header
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert _message(e).startswith(f"could not read {weights} as safetensors (truncated or corrupt?): ")


def test_library_errors_are_described_on_one_line(monkeypatch, tmp_path, small_published):
    """``Type: message`` with the message's whitespace collapsed; the type alone when it is empty."""
    cfg, state = small_published
    folder = _hub(tmp_path / "hub", cfg, state)
    weights = folder / "model.safetensors"
    errors = iter([OSError("bad\n   header  here"), RuntimeError()])

    def failing(*args, **kwargs):
        raise next(errors)

    monkeypatch.setattr(ckpt_mod, "load_file", failing)
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert _message(e) == f"could not read {weights} as safetensors (truncated or corrupt?): OSError: bad header here"
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert _message(e) == f"could not read {weights} as safetensors (truncated or corrupt?): RuntimeError"
    weights.unlink()
    torch.save(state, folder / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(ValueError("zip\tbroken")))
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert _message(e) == (f"could not read {folder / 'pytorch_model.bin'} as a weights-only torch checkpoint "
                           f"(truncated or corrupt?): ValueError: zip broken")


def test_gpu_saved_weights_load_on_the_cpu(monkeypatch, tmp_path, small_published):
    """A .bin written on a GPU (storages tagged cuda:0) loads on a machine without one."""
    cfg, state = small_published
    folder = _hub(tmp_path / "hub", cfg)
    with monkeypatch.context() as m:  # save as if every storage lived on cuda:0
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, folder / "pytorch_model.bin")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, _ = load_model(folder)
    assert torch.equal(model.state_dict()["blocks.0.attn_out.weight"], state["blocks.0.attn_out.weight"])


def test_pickles_stay_inert_when_the_environment_asks_for_unsafe_loading(monkeypatch, tmp_path, small_published):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns off weights-only loading wherever torch.load is not told
    explicitly; the loader tells it, so a pickle still cannot run code."""
    cfg, _ = small_published
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    folder = _hub(tmp_path / "hub", cfg)
    torch.save({"x": Payload()}, folder / "pytorch_model.bin")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert _message(e).startswith(f"could not read {folder / 'pytorch_model.bin'} as a weights-only torch checkpoint")
    assert not marker.exists()


# ---------------------------------------------------------------------------- run folders
def test_run_config_errors_name_the_file(tmp_path):
    config, _ = _run(tmp_path / "list", "- 1\n- 2\n")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "list")
    assert _message(e) == f"{config} holds a list, not a config mapping"
    config, _ = _run(tmp_path / "bad", "a: [1,\n")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "bad")
    assert _message(e) == (f"{config} is not valid YAML: while parsing a flow node expected the node content, "
                           "but found '<stream end>' in \"<unicode string>\", line 2, column 1: ^")


def test_run_checkpoint_contents(tmp_path, small_published):
    cfg, _ = small_published
    text = yaml.safe_dump(cfg)
    n_params = len(list(RADD(RADDConfig.from_dict(cfg)).parameters()))
    cases = [
        ([1, 2], "{path} holds a list, not a training checkpoint dict"),
        ({"model": {}, "step": 3}, "{path} has no 'ema' entry (keys: ['model', 'step'])"),
        ({"model": {}, "ema": {"decay": 0.9}}, "{path}: EMA state has no 'shadow_params' (keys: ['decay'])"),
        ({"model": {}, "ema": {"shadow_params": [torch.zeros(1)]}},
         "{path}: EMA holds 1 tensors but the model has " + f"{n_params} parameters"),
    ]
    for i, (content, expected) in enumerate(cases):
        _, path = _run(tmp_path / f"run{i}", text, content)
        with pytest.raises(CheckpointError) as e:
            load_model(tmp_path / f"run{i}")
        assert _message(e) == expected.format(path=path)


_READ_UNDER_ASCII_LOCALE = """
import sys
import radd_fast
radd_fast.load_model(sys.argv[1])
radd_fast.load_model(sys.argv[2])
print("loaded")
"""


def test_configs_are_read_as_utf8_whatever_the_locale(tmp_path, small_published):
    """A config with non-ASCII text loads under an ASCII locale (C, no UTF-8 mode or coercion)."""
    cfg, state = small_published
    cfg = dict(cfg, data={"train": "openwebtext", "note": "café — naïve"})
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    save_file(state, str(hub / "model.safetensors"))
    model = RADD(RADDConfig.from_dict(cfg))
    _run(tmp_path / "run", yaml.safe_dump(cfg, allow_unicode=True),
         {"model": model.state_dict(), "ema": {"shadow_params": [p.detach() for p in model.parameters()]}})
    for folder in (hub, tmp_path / "run"):  # here (a UTF-8 locale, most likely) ...
        load_model(folder)
    # ... and in a process whose locale encoding is ASCII
    root = Path(radd_fast.__file__).resolve().parent.parent  # the radd_fast this test imported
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONCOERCECLOCALE="0", PYTHONUTF8="0",
               PYTHONPATH=str(root), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", _READ_UNDER_ASCII_LOCALE, str(hub), str(tmp_path / "run")],
                         cwd=root, env=env, text=True, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "loaded"


# ---------------------------------------------------------------------------- state dict checks
def _model(cfg) -> RADD:
    return RADD(RADDConfig.from_dict(cfg))


def test_vocab_mismatch_names_both_sizes(tmp_path, small_published):
    cfg, state = small_published
    folder = _hub(tmp_path / "hub", dict(cfg, tokens=TOKENS + 5), state)
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert _message(e) == (f"{folder / 'model.safetensors'}: vocab mismatch: checkpoint embedding has "
                           f"{TOKENS + 1} rows, the config says tokens + 1 = {TOKENS + 6}")


@pytest.mark.parametrize("n_missing, n_extra", [(9, 8), (8, 9)])
def test_key_lists_show_eight_names_then_an_ellipsis(small_published, n_missing, n_extra):
    cfg, state = small_published
    dropped = sorted(state)[:n_missing]
    extra = [f"extra.{i}" for i in range(n_extra)]
    broken = {k: v for k, v in state.items() if k not in dropped}
    broken.update({k: torch.zeros(1) for k in extra})
    with pytest.raises(CheckpointError) as e:
        ckpt_mod.load_state_dict_checked(_model(cfg), broken)
    missing_text = f"{dropped[:8]}{' ...' if n_missing == 9 else ''}"
    extra_text = f"{sorted(extra)[:8]}{' ...' if n_extra == 9 else ''}"
    assert _message(e) == (f"state dict does not match the RADD layout: missing keys {missing_text}, "
                           f"unexpected keys {extra_text}")


def test_every_shape_mismatch_is_listed(small_published):
    cfg, state = small_published
    bad = dict(state)
    bad["blocks.0.norm1.weight"] = torch.zeros(5)
    bad["blocks.0.mlp.0.bias"] = torch.zeros(3, 2)
    with pytest.raises(CheckpointError) as e:
        ckpt_mod.load_state_dict_checked(_model(cfg), bad)
    assert _message(e) == (f"shape mismatch: blocks.0.norm1.weight: expected ({D},), found (5,); "
                           f"blocks.0.mlp.0.bias: expected ({4 * D},), found (3, 2)")


# ---------------------------------------------------------------------------- checksums (.sha256 sidecars)
def _write_sidecar(path: Path) -> None:
    """``sha256sum``'s line for ``path``, as training writes it beside every checkpoint."""
    (path.parent / (path.name + ".sha256")).write_text(f"{ckpt_mod.file_sha256(path)}  {path.name}\n")


def _assert_serves(model, shadow) -> None:
    for p, s in zip(model.parameters(), shadow):
        assert torch.equal(p.detach(), s)


def test_hub_weights_that_match_their_sidecar_load(tmp_path, small_published):
    cfg, state = small_published
    folder = _hub(tmp_path / "hub", cfg, state)
    _write_sidecar(folder / "model.safetensors")
    model, _ = load_model(folder)
    assert torch.equal(model.state_dict()["vocab_embed.embedding"], state["vocab_embed.embedding"])


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hub_weights_that_differ_from_their_sidecar_are_refused(tmp_path, small_published, fmt):
    """64 inverted bytes inside the weights still load (different weights): the sidecar refuses them."""
    cfg, state = small_published
    folder = write_hub(tmp_path / "hub", cfg, state, fmt)
    weights = folder / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    _write_sidecar(weights)
    flip_bytes(weights)
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert _message(e) == f"{weights}: its SHA-256 does not match {weights.name}.sha256 (truncated or corrupted)"
    (folder / (weights.name + ".sha256")).write_text("not a checksum\n")
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert _message(e) == f"{weights}: its checksum file {weights.name}.sha256 is unreadable"


def test_a_run_folder_serves_its_meta_checkpoint_when_intact(tmp_path, small_published):
    shadows = write_run_folder(tmp_path / "run", _model(small_published[0]))
    model, _ = load_model(tmp_path / "run")
    _assert_serves(model, shadows[6])


def test_a_corrupt_run_checkpoint_falls_back_to_the_newest_intact_snapshot(tmp_path, small_published, caplog):
    """As a resume does (the same ``newest_intact``): one warning naming what was wrong and what is served."""
    run = tmp_path / "run"
    shadows = write_run_folder(run, _model(small_published[0]))
    meta, newest = run / "checkpoints-meta" / "checkpoint.pth", run / "checkpoints" / "checkpoint_4.pth"
    flip_bytes(meta)
    with caplog.at_level(logging.WARNING, logger="radd_fast"):
        model, _ = load_model(run)
    _assert_serves(model, shadows[4])
    assert [r.getMessage() for r in caplog.records] == [
        f"{meta}: its SHA-256 does not match checkpoint.pth.sha256 (truncated or corrupted); "
        f"loading {newest} (step 4) instead"]
    flip_bytes(newest)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="radd_fast"):
        model, _ = load_model(run)
    _assert_serves(model, shadows[2])
    assert "checkpoint_4.pth.sha256" in caplog.records[0].getMessage()


def test_a_run_folder_without_an_intact_checkpoint_is_refused(tmp_path, small_published):
    run = tmp_path / "run"
    write_run_folder(run, _model(small_published[0]), snapshot_steps=())
    meta = run / "checkpoints-meta" / "checkpoint.pth"
    flip_bytes(meta)
    with pytest.raises(CheckpointError) as e:  # one file: its own error
        load_model(run)
    assert _message(e) == f"{meta}: its SHA-256 does not match checkpoint.pth.sha256 (truncated or corrupted)"
    write_run_folder(tmp_path / "run2", _model(small_published[0]), snapshot_steps=(2,))
    for path in (tmp_path / "run2").rglob("checkpoint*.pth"):
        flip_bytes(path)
    with pytest.raises(CheckpointError) as e:  # several: each named
        load_model(tmp_path / "run2")
    meta2, snap2 = tmp_path / "run2" / "checkpoints-meta" / "checkpoint.pth", tmp_path / "run2" / "checkpoints" / "checkpoint_2.pth"
    assert _message(e) == (f"no usable checkpoint in {tmp_path / 'run2'}: "
                           f"{meta2}: its SHA-256 does not match checkpoint.pth.sha256 (truncated or corrupted); "
                           f"{snap2}: its SHA-256 does not match checkpoint_2.pth.sha256 (truncated or corrupted)")


def test_loading_and_resuming_share_one_fallback():
    """Serving a run folder and resuming it pick the checkpoint with the same function."""
    assert training_state.newest_intact is ckpt_mod.newest_intact and training_state.checksum_problem is ckpt_mod.checksum_problem
