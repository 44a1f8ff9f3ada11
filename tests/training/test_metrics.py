"""The metrics file (radd_fast/training/metrics.py): a resumed run drops the records past its resume point;
a full disk is one error naming the file and leaves whole lines."""
import json

import pytest

from radd_fast.files import WriteError
from radd_fast.training.metrics import Metrics, drop_records_after
from tests.support.faults import full_disk


def test_drop_records_after_keeps_earlier_steps_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
    assert drop_records_after(path, 2) == 2
    assert path.read_text() == '{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n'
    assert drop_records_after(path, 2) == 0 and drop_records_after(tmp_path / "absent.jsonl", 0) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary left


def test_a_full_disk_stops_the_log_in_one_error_and_keeps_whole_lines(tmp_path, monkeypatch):
    full_disk(monkeypatch, tmp_path, free=70)  # a record is about 45 bytes: the first fits, part of the second
    metrics = Metrics(tmp_path, enabled=True, total=10, initial=0, progress=False)
    metrics.log(1, loss=3.0)
    with pytest.raises(WriteError) as e:
        metrics.log(2, loss=2.0)
    metrics.close()
    path = tmp_path / "metrics.jsonl"
    assert str(e.value) == (f"no space left on device while writing {path}: its earlier lines are kept whole; free "
                            f"some space and run again (load_dir=<run folder> resumes a run from its last checkpoint)")
    text = path.read_text()
    assert text.endswith("\n") and [json.loads(line)["step"] for line in text.splitlines()] == [1]
