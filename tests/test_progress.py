"""The one progress bar: silent when off, and console log lines routed above a running bar."""
import io
import logging

from radd_fast import progress


def test_silent_bar_takes_every_call():
    bar = progress.progress_bar(False, total=3)
    bar.update(2)
    bar.set_postfix(loss=1.0)
    bar.total += 4
    bar.refresh()
    bar.close()


def test_console_log_lines_go_through_tqdm_write_while_a_bar_runs(monkeypatch):
    root = logging.getLogger()
    stream = io.StringIO()
    console = logging.StreamHandler(stream)
    files = logging.FileHandler("/dev/null")
    root.addHandler(console)
    root.addHandler(files)
    written = []
    monkeypatch.setattr(progress.tqdm, "write", staticmethod(lambda line, file=None: written.append((line, file))))
    try:
        undo = progress.log_above_bars()
        assert console not in root.handlers and files in root.handlers  # files keep their handler
        logging.getLogger("radd_fast.test").warning("evaluation loss 1.25")
        assert written == [("evaluation loss 1.25", stream)]
        undo()
        assert console in root.handlers
    finally:
        root.removeHandler(console)
        root.removeHandler(files)
        files.close()
