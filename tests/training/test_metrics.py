"""The metrics file (radd_fast/training/metrics.py): a resumed run drops the records past its resume point."""
from radd_fast.training.metrics import drop_records_after


def test_drop_records_after_keeps_earlier_steps_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
    assert drop_records_after(path, 2) == 2
    assert path.read_text() == '{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n'
    assert drop_records_after(path, 2) == 0 and drop_records_after(tmp_path / "absent.jsonl", 0) == 0
