"""Snapshot sampling during training (radd_fast/training/snapshot.py)."""
import pytest

from radd_fast.training import train
from tests.support.runs import tiny_config


def test_snapshot_sampling_writes_samples_or_skips(tmp_path):
    cfg = tiny_config(tmp_path, training={"n_iters": 3, "snapshot_sampling": True, "eval_freq": 0})
    train(cfg, tmp_path / "run")
    try:
        from radd_fast.sampling import generate  # noqa: F401
    except ImportError:
        assert not (tmp_path / "run" / "samples" / "iter_3").exists()
        return
    text = (tmp_path / "run" / "samples" / "iter_3" / "sample_0.txt").read_text(encoding="utf-8")
    assert text.count("=" * 92) == 2






@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("RADD_DEBUG", raising=False)


def test_a_missing_scorer_skips_the_generative_perplexity(tmp_path, caplog, offline):
    """Offline, the default scorer gpt2-large cannot be had: the snapshot warns once and training goes on."""
    from radd_fast.training import snapshot, train

    snapshot._unusable_scorers.clear()
    cfg = tiny_config(tmp_path, training={"n_iters": 2, "snapshot_freq": 1, "snapshot_sampling": True,
                                          "eval_freq": 0},
                      eval={"batch_size": 4, "perplexity": True, "perplexity_model": "gpt2-large"},
                      sampling={"steps": 2, "num_samples": 1})
    with caplog.at_level("WARNING", logger="radd_fast.training.snapshot"):
        assert train(cfg, tmp_path / "run")["step"] == 2
    warnings = [r.getMessage() for r in caplog.records if "generative perplexity" in r.getMessage()]
    assert len(warnings) == 1 and "HF_HUB_OFFLINE is set" in warnings[0]  # once, not at every snapshot
    assert (tmp_path / "run" / "samples" / "iter_2" / "sample_0.txt").exists()
