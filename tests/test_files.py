"""radd_fast/files.py: whole files replaced atomically, streamed files kept to whole lines, and a full disk
(or a quota, a read-only file system, a refused permission) as one WriteError naming the path. The
disk fills up in process (tests/support/faults.py); messages compared whole."""
from __future__ import annotations

import errno
import json
import logging
import os

import pytest
import torch

from radd_fast import files
from radd_fast.errors import UserError
from radd_fast.files import (
    KEPT,
    REPLACED,
    LineFile,
    LineLogHandler,
    WriteError,
    atomic_write,
    atomic_write_json,
    write_errors,
)
from tests.support.faults import disk_full, full_disk


def listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class TestAtomicWrite:
    def test_writes_the_file_and_leaves_no_temporary(self, tmp_path):
        atomic_write_json(tmp_path / "out" / "r.json", {"ppl": 1.5})
        assert json.loads((tmp_path / "out" / "r.json").read_text()) == {"ppl": 1.5}
        assert listing(tmp_path / "out") == ["r.json"]

    def test_a_full_disk_is_one_error_naming_the_path_and_the_old_file_stays(self, tmp_path, monkeypatch):
        path = tmp_path / "r.json"
        path.write_text("old")
        full_disk(monkeypatch, tmp_path, free=3)
        with pytest.raises(WriteError) as e:
            atomic_write_json(path, {"ppl": 1.5})
        assert str(e.value) == f"no space left on device while writing {path}: {REPLACED}"
        assert isinstance(e.value, UserError) and isinstance(e.value.__cause__, OSError)
        monkeypatch.undo()
        assert path.read_text() == "old" and listing(tmp_path) == ["r.json"]

    def test_a_failed_rename_removes_the_temporary(self, tmp_path, monkeypatch):
        def no_rename(src, dst):
            raise disk_full()

        monkeypatch.setattr(files.os, "replace", no_rename)
        with pytest.raises(WriteError, match=r"^no space left on device while writing .*r\.json: "):
            atomic_write_json(tmp_path / "r.json", {})
        assert listing(tmp_path) == []

    def test_torch_wrapping_the_disk_error_is_seen_through(self, tmp_path, monkeypatch):
        """torch.save reports its writer's OSError inside a RuntimeError."""
        full_disk(monkeypatch, tmp_path, free=100)
        with pytest.raises(WriteError, match="^no space left on device while writing"):
            atomic_write(tmp_path / "w.pth", lambda fh: torch.save({"w": torch.zeros(1000)}, fh))
        monkeypatch.undo()
        assert listing(tmp_path) == []

    def test_ctrl_c_while_writing_leaves_nothing(self, tmp_path):
        def interrupted(fh):
            fh.write(b"half")
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            atomic_write(tmp_path / "r.bin", interrupted)
        assert listing(tmp_path) == []

    @pytest.mark.parametrize("code, words", [(errno.EDQUOT, "disk quota exceeded"),
                                             (errno.EROFS, "read-only file system"),
                                             (errno.EACCES, "permission denied")])
    def test_each_disk_error_has_its_words(self, tmp_path, code, words):
        with pytest.raises(WriteError) as e, write_errors(tmp_path / "x", advice="advice"):
            raise OSError(code, os.strerror(code))
        assert str(e.value) == f"{words} while writing {tmp_path / 'x'}: advice"

    def test_other_failures_keep_their_own_error(self, tmp_path):
        with pytest.raises(OSError) as e, write_errors(tmp_path / "x"):
            raise OSError(errno.EIO, "I/O error")
        assert not isinstance(e.value, UserError)

    def test_the_caller_picks_the_error_type(self, tmp_path):
        class ReportError(UserError):
            pass

        with pytest.raises(ReportError), write_errors(tmp_path / "x", error_type=ReportError):
            raise disk_full()


class TestLineFile:
    def test_lines_are_on_disk_after_each_write(self, tmp_path):
        path = tmp_path / "s.jsonl"
        with LineFile(path, "w") as out:
            out.write_lines(['{"i": 0}'])
            assert path.read_text() == '{"i": 0}\n'
            out.write_lines(['{"i": 1}', '{"i": 2}'])
        assert path.read_text().splitlines() == ['{"i": 0}', '{"i": 1}', '{"i": 2}']
        with LineFile(path, "a") as out:
            out.write_lines(["more"])
        assert path.read_text().splitlines()[-1] == "more"
        with LineFile(path, "w"):
            pass
        assert path.read_text() == ""

    def test_a_full_disk_keeps_only_whole_lines(self, tmp_path, monkeypatch):
        path = tmp_path / "s.jsonl"
        path.write_text("earlier\n")
        full_disk(monkeypatch, tmp_path, free=25)
        out = LineFile(path, "a")
        out.write_lines(["0123456789"])  # 11 bytes fit
        with pytest.raises(WriteError) as e:
            out.write_lines(["abcdefghij", "klmnopqrst"])  # 14 of its 22 bytes reach the disk, then ENOSPC
        out.close()
        assert str(e.value) == f"no space left on device while writing {path}: {KEPT}"
        assert path.read_text() == "earlier\n0123456789\n"

    def test_ctrl_c_in_a_write_keeps_only_whole_lines(self, tmp_path):
        path = tmp_path / "s.jsonl"
        out = LineFile(path, "w")
        out.write_lines(["kept"])

        class Interrupted:
            def __init__(self, fh):
                self.fh = fh

            def write(self, data):
                self.fh.write(bytes(data[:3]))
                raise KeyboardInterrupt

            def __getattr__(self, name):
                return getattr(self.fh, name)

        out.fh = Interrupted(out.fh)
        with pytest.raises(KeyboardInterrupt):
            out.write_lines(["lost line"])
        out.close()
        assert path.read_text() == "kept\n"

    def test_a_folder_that_cannot_be_written_is_named_at_open(self, tmp_path, monkeypatch):
        def read_only(self, *args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(type(tmp_path), "open", read_only)
        with pytest.raises(WriteError, match=f"^read-only file system while writing {tmp_path / 's.jsonl'}: "):
            LineFile(tmp_path / "s.jsonl", "w")


class TestLineLogHandler:
    def test_records_are_whole_lines_and_a_full_disk_reaches_the_caller(self, tmp_path, monkeypatch, capsys):
        path = tmp_path / "logs"
        full_disk(monkeypatch, tmp_path, free=30)
        handler = LineLogHandler(path, advice="advice")
        log = logging.getLogger("radd_fast.test_files")
        log.addHandler(handler)
        log.propagate = False
        try:
            log.warning("first record")  # 12 bytes
            with pytest.raises(WriteError) as e:
                log.warning("a second record, too long to fit")
        finally:
            log.removeHandler(handler)
            log.propagate = True
            handler.close()  # nothing left to flush: no second error
        assert str(e.value) == f"no space left on device while writing {path}: advice"
        assert path.read_text() == "first record\n"
        assert "Logging error" not in capsys.readouterr().err
