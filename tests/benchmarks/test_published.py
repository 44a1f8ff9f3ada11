"""The harness around the published RADD code (benchmarks/published.py): imported from a checkout
without leaking into our imports, loaded with our exact weights, its samplers / training step /
evaluation runnable on CPU, and clear errors for a bad checkout (gpu_check's dry run:
tests/benchmarks/test_gpu_check.py).

The published code is looked for beside the checkout (CI lays ``../shared/published-radd``) or at
``$RADD_PUBLISHED``; the tests that need it skip with the reason when it or its dependencies
(einops, omegaconf: ``pip install -e ".[bench]"``) are absent."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from benchmarks import bench_e2e, e2e_setup
from benchmarks import published as pubcode
from radd_fast import RADD
from tests.support.paths import REPO
from tests.support.published_code import published_checkout


@pytest.fixture(scope="module")
def quick_providers():
    path = published_checkout()
    return e2e_setup.build_providers(e2e_setup.size_config("quick"), torch.device("cpu"), published=path)


def test_import_restores_sys_path_and_our_module_names(monkeypatch):
    path = published_checkout()
    monkeypatch.setattr(pubcode, "_LOADED", {})  # a fresh import, not the cached one
    sentinel = ModuleType("utils")
    monkeypatch.setitem(sys.modules, "utils", sentinel)
    path_before = list(sys.path)
    pub = pubcode.load_published(path)
    assert sys.path == path_before
    assert sys.modules["utils"] is sentinel  # a module of the same name loaded before comes back
    for name in ("model", "losses", "sampling", "noise_lib", "catsample", "load_model"):
        assert name not in sys.modules, name
        assert Path(sys.modules[f"{pubcode.PREFIX}.{name}"].__file__).resolve().is_relative_to(path.resolve())
    assert Path(pub.sampling.__file__).resolve() == (path / "sampling.py").resolve()
    assert len(pub.digest) == 64 and pub.describe()["label"] == "published"


def test_twin_has_our_exact_weights_a_nonzero_head_and_our_output(quick_providers):
    P = quick_providers
    pubcode.check_same_weights(P.ref, P.pub_model)
    assert P.pub_model.output_layer.linear.weight.abs().sum() > 0  # the published init is zero
    x = torch.randint(0, P.ref.vocab_size - 1, (3, P.ref.length))
    with torch.no_grad(), pubcode.quiet():
        theirs = P.pub_model(x)
    torch.testing.assert_close(theirs.float(), P.ref.eval()(x), atol=1e-5, rtol=1e-5)


def test_a_changed_weight_is_caught(quick_providers):
    P = quick_providers
    other = RADD(P.ref.config)
    other.load_state_dict(P.ref.state_dict())
    with torch.no_grad():
        other.blocks[0].attn_out.weight[0, 0] += 1.0
    with pytest.raises(RuntimeError, match="blocks.0.attn_out.weight"):
        pubcode.check_same_weights(other, P.pub_model)


def test_published_samplers_finish_count_and_repeat(quick_providers):
    P = quick_providers
    L, steps = P.ref.length, 16
    x1, enfe = pubcode.sample_cached(P.pub, P.pub_model, P.pub_noise, 4, L, steps, seed=3)
    x2, _ = pubcode.sample_cached(P.pub, P.pub_model, P.pub_noise, 4, L, steps, seed=3)
    assert x1.shape == (4, L) and not (x1 == P.ref.mask_id).any()
    assert torch.equal(x1, x2)  # seeded through the global generator, as the published code draws
    assert 1 <= enfe <= steps
    x3, enfe_nc = pubcode.sample_without_cache(P.pub, P.pub_model, P.pub_noise, 4, L, steps, seed=3)
    assert enfe_nc == steps and not (x3 == P.ref.mask_id).any()


def test_training_section_restores_the_shared_weights(quick_providers):
    P = quick_providers
    before = {k: v.clone() for k, v in P.ref.state_dict().items()}
    rows = bench_e2e.bench_train(P, torch.device("cpu"), "quick", 2, P.ref.length, 1)
    assert [r["provider"] for r in rows] == ["published", "reference", "fast"]
    for model in (P.ref, P.ours["fast"], P.pub_model):
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_published_eval_is_finite(quick_providers):
    P = quick_providers
    x = torch.randint(0, P.ref.vocab_size - 1, (2, P.ref.length))
    loss = pubcode.eval_fn(P.pub, P.pub_model, P.pub_noise, x, 2)()
    assert torch.isfinite(loss) and loss > 0


def test_bad_checkouts_are_user_errors(tmp_path, monkeypatch):
    with pytest.raises(pubcode.PublishedCodeError, match="no such folder"):
        pubcode.load_published(tmp_path / "nope")
    (tmp_path / "model").mkdir()
    (tmp_path / "sampling.py").write_text("")
    with pytest.raises(pubcode.PublishedCodeError, match="missing model/__init__.py"):
        pubcode.load_published(tmp_path)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "einops" else real_find_spec(name, *a))
    with pytest.raises(pubcode.PublishedCodeError, match=r"einops, which is not installed: pip install"):
        pubcode.check_dependencies()


def test_cli_names_a_bad_published_path_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_e2e", "--quick", "--published",
                           str(tmp_path / "nope"), "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: --published {tmp_path / 'nope'}: no such folder (point it at "
                                                "a checkout of the published RADD code, github.com/ML-GSAI/RADD)"]
    assert "Traceback" not in proc.stderr
