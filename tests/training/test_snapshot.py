"""Snapshot sampling during training (radd_fast/training/snapshot.py)."""
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
