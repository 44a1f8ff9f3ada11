"""radd_fast/errors.py: the one user-error type, the one flag parser of the three CLIs, and the CLI
edge that turns either into one ``error: ...`` line and exit code 2."""
from __future__ import annotations

import pytest

import radd_fast.evaluation as evaluation
import radd_fast.training as training
from radd_fast.errors import ArgParser, NonFiniteLossError, UsageError, UserError, run_cli
from radd_fast.evaluation import ppl
from radd_fast.training import loop


class OwnError(UserError):
    pass


def parser(**kwargs) -> ArgParser:
    p = ArgParser(prog="tool.py", **kwargs)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--kind", choices=("a", "b"), default="a")
    return p


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--count"], "argument --count: expected one argument"),
    (["--count", "x"], "argument --count: invalid int value: 'x'"),
    (["--kind", "c"], "argument --kind: invalid choice: 'c'"),
])
def test_a_bad_flag_raises_instead_of_printing_usage(argv, message, capsys):
    with pytest.raises(UsageError) as err:
        parser().parse_args(argv)
    assert message in str(err.value)
    assert capsys.readouterr() == ("", "")  # no usage printed, no exit


def test_the_error_type_is_the_clis_own():
    with pytest.raises(OwnError, match="unrecognized arguments"):
        parser(error_type=OwnError).parse_args(["--bogus"])
    assert parser().parse_args(["--count", "3"]).count == 3


def test_help_still_prints_and_exits_0(capsys):
    with pytest.raises(SystemExit) as done:
        parser().parse_args(["--help"])
    assert done.value.code == 0 and "usage: tool.py" in capsys.readouterr().out


def test_run_cli_reports_a_bad_flag_in_one_line_with_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("RADD_DEBUG", raising=False)

    def main(argv):
        parser().parse_args(argv)
        return 0

    assert run_cli(main, ["--kind", "c"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: argument --kind: invalid choice: 'c'")
    assert run_cli(main, ["--count", "2"]) == 0
    with pytest.raises(UsageError):  # --debug: the traceback instead
        run_cli(main, ["--bogus", "--debug"])


def test_one_non_finite_loss_error_for_training_and_evaluation():
    """Training and evaluation raise the same type under the same name (it was two: NonFiniteLoss)."""
    assert issubclass(NonFiniteLossError, UserError)
    assert training.NonFiniteLossError is evaluation.NonFiniteLossError is NonFiniteLossError
    assert loop.NonFiniteLossError is ppl.NonFiniteLossError is NonFiniteLossError
    assert not hasattr(evaluation, "NonFiniteLoss") and not hasattr(ppl, "NonFiniteLoss")


@pytest.mark.parametrize("interrupt, line", [
    (KeyboardInterrupt(), "interrupted"),
    (KeyboardInterrupt("12 samples in s.jsonl,\n whole lines"), "interrupted: 12 samples in s.jsonl, whole lines"),
])
def test_ctrl_c_is_one_line_and_exit_130_saying_what_was_kept(capsys, monkeypatch, interrupt, line):
    monkeypatch.delenv("RADD_DEBUG", raising=False)

    def main(args):
        raise interrupt

    assert run_cli(main, []) == 130
    assert capsys.readouterr().err.splitlines() == [line]


def test_a_switch_takes_both_off_spellings_and_keeps_its_default():
    from radd_fast.errors import Switch

    p = ArgParser(prog="tool.py")
    p.add_argument("--graphs", action=Switch, default=None, help="on / off")
    assert [p.parse_args(a).graphs for a in ([], ["--graphs"], ["--no_graphs"], ["--no-graphs"])] == \
        [None, True, False, False]
    assert p.parse_args(["--graphs", "--no_graphs"]).graphs is False  # the last one wins
    assert "[--graphs | --no_graphs | --no-graphs]" in p.format_usage()
    with pytest.raises(UsageError, match="ignored explicit argument 'yes'"):
        p.parse_args(["--graphs=yes"])
