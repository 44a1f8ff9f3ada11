"""sample.py end to end on a saved checkpoint with the byte tokenizer (in process; the
subprocess runs a user makes, with their exit codes and one-line errors, are in tests/cli/)."""
import json

import pytest

import sample
from radd_fast.distributed import DistEnv
from radd_fast.sampling import SamplerConfig
from radd_fast.sampling import cli as sample_cli
from radd_fast.sampling.strategies import PUBLISHED_CLI_TOP_P, PUBLISHED_LIBRARY_TOP_P
from tests.support.models import random_head_model
from tests.support.noise_streams import assert_fresh_noise, record_noise


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    random_head_model(tokens=256, length=16).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("loop,method,strategy", [("fast", "tweedie", "direct"), ("published_api", "euler", "top_p"),
                                                  ("fast", "ordered", "top_k")])
def test_cli_writes_jsonl_with_the_conditioning(ckpt, tmp_path, capsys, loop, method, strategy):
    out = tmp_path / "s.jsonl"
    args = ["--model_path", ckpt, "--tokenizer", "bytes", "--rows_in_flight", "3", "--num_samples", "5",
            "--steps", "8", "--method", method, "--strategy", strategy, "--prefix", "ab", "--suffix", "yz",
            "--infill", "6:mid", "--seed", "0", "--loop", loop, "--out", str(out), "--no_progress",
            "--device", "cpu"]
    if strategy != "direct":
        args += ["--strategy_para", "0.9" if strategy == "top_p" else "5"]
    assert sample.main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(5))
    for r in rows:
        ids = r["ids"]
        assert len(ids) == 16 and max(ids) < 256
        assert ids[:2] == list(b"ab") and ids[-2:] == list(b"yz") and ids[6:9] == list(b"mid")
        assert isinstance(r["text"], str) and 1 <= r["enfe"] <= 8
    printed = capsys.readouterr().out
    assert "E-NFE" in printed and "tokens/s" in printed and "sample 4" in printed
    assert printed.count("E-NFE") == 1  # one summary line, not the engine's and the CLI's
    assert printed.splitlines()[-1].startswith(f"loop {loop} | ")  # the summary names the loop


def test_batch_size_is_the_number_of_samples(ckpt, tmp_path):
    """Published meaning: --batch_size N draws N samples (rows in flight are --rows_in_flight)."""
    out = tmp_path / "s.jsonl"
    assert sample.main(["--model_path", ckpt, "--tokenizer", "bytes", "--batch_size", "6", "--steps", "4",
                        "--seed", "0", "--out", str(out), "--no_progress", "--device", "cpu"]) == 0
    assert len(out.read_text().splitlines()) == 6


@pytest.mark.parametrize("loop", ["fast", "published_api"])
def test_ordered_defaults_to_left_to_right(ckpt, tmp_path, loop):
    """--method ordered with steps = length reveals one position per step, left to right (published
    run_sample.py passes arange); --order random is a different schedule."""
    def run(*extra):
        out = tmp_path / "o.jsonl"
        assert sample.main(["--model_path", ckpt, "--tokenizer", "bytes", "--batch_size", "2", "--steps", "16",
                            "--method", "ordered", "--seed", "1", "--loop", loop, "--out", str(out),
                            "--no_progress", "--device", "cpu", *extra]) == 0
        return [json.loads(line)["ids"] for line in out.read_text().splitlines()]

    assert run() == run("--order", "left_to_right")
    assert run() != run("--order", "random")


def test_published_strategy_para_defaults():
    from radd_fast.sampling.cli import build_parser, check_args

    def para(*extra):
        return check_args(build_parser().parse_args(["--device", "cpu", *extra])).sampler.strategy_para

    assert para("--strategy", "top_p") == PUBLISHED_CLI_TOP_P == 0.8  # run_sample.py's --strategy_para default
    assert para("--strategy", "top_k") == 400  # catsample.top_k_sampling's k (0.8 is no k)
    assert para("--strategy", "direct") is None
    # the library API keeps the published library's own top-p default
    assert SamplerConfig(strategy="top_p").strategy_para == PUBLISHED_LIBRARY_TOP_P == 0.9


def loop_of(*flags) -> str:
    return sample_cli.check_args(sample_cli.build_parser().parse_args(["--device", "cpu", *flags])).loop


def test_loop_picks_the_sampling_loop():
    assert loop_of() == "fast" and loop_of("--loop", "published_api") == "published_api"
    with pytest.raises(sample_cli.SampleArgError, match="argument --loop: invalid choice: 'reference'"):
        loop_of("--loop", "reference")  # "reference" is a --backend, not a loop


@pytest.mark.parametrize("engine, loop", [("fast", "fast"), ("reference", "published_api")])
def test_engine_still_works_as_the_deprecated_name_of_loop(capsys, engine, loop):
    assert loop_of("--engine", engine) == loop
    assert capsys.readouterr().err.splitlines() == [f"warning: --engine is deprecated: use --loop {loop}"]
    assert loop_of("--engine", engine, "--loop", loop) == loop  # the same loop twice: fine


def test_engine_and_a_different_loop_are_one_error_line(ckpt, capsys):
    assert sample.main(["--model_path", ckpt, "--engine", "reference", "--loop", "fast", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --engine reference (the deprecated name of --loop published_api) contradicts --loop fast: "
        "pass --loop only"]


def test_cli_is_deterministic_with_a_seed(ckpt, tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"{i}.jsonl"
        sample.main(["--model_path", ckpt, "--tokenizer", "bytes", "--batch_size", "4", "--steps", "6",
                     "--seed", "3", "--out", str(out), "--no_progress", "--device", "cpu"])
        outs.append(out.read_text())
    assert outs[0] == outs[1]


@pytest.mark.parametrize("extra,message", [
    (["--method", "ddim"], "invalid choice"),
    (["--strategy", "top_k", "--strategy_para", "5.5"], "got 5.5 (--strategy_para)"),
    (["--infill", "10:"], "no text after the colon"),
    (["--infill", "-5:x"], "position must be >= 0"),
    (["--strategy", "greedy"], "invalid choice"),
    (["--strategy", "top_p", "--strategy_para", "1.5"], "top_p needs"),
    (["--strategy", "top_k", "--strategy_para", "0"], "top_k needs"),
    (["--steps", "0"], "--steps must be"),
    (["--prefix", "abcdefghij", "--suffix", "klmnopq"], "longer than the sequence length"),
    (["--infill", "15:xyz"], "outside the sequence"),
    (["--infill", "x:abc"], "POS:TEXT"),
    (["--length", "17"], "exceeds the model's length"),
])
def test_cli_errors(ckpt, capsys, extra, message):
    code = sample.main(["--model_path", ckpt, "--tokenizer", "bytes", "--device", "cpu", "--no_progress"] + extra)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert message in err


def test_samples_are_written_as_they_finish_and_every_record_says_how_it_was_sampled(ckpt, tmp_path, monkeypatch,
                                                                                     capsys):
    """The fast loop hands finished samples over while it runs (here at every chance: on_rows_every=0) and
    each hand-over is on disk, in whole lines, before the run goes on; fp64 Gumbel unless --sampling_dtype
    float32; the summary names the seed."""
    out = tmp_path / "s.jsonl"
    seen = []
    real = sample_cli.generate

    def spy(*args, on_rows, **kwargs):
        def rows(first, tokens, enfe):
            seen.append((first, len(out.read_text().splitlines())))  # lines on disk before this hand-over
            on_rows(first, tokens, enfe)
        return real(*args, on_rows=rows, on_rows_every=0, **kwargs)

    monkeypatch.setattr(sample_cli, "generate", spy)
    assert sample.main(["--model_path", ckpt, "--tokenizer", "bytes", "--batch_size", "10", "--steps", "4",
                        "--rows_in_flight", "2", "--seed", "3", "--out", str(out), "--no_progress",
                        "--device", "cpu"]) == 0
    assert len(seen) > 2 and all(first == lines for first, lines in seen)  # every earlier sample already written
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(10))
    assert all("fp64 Gumbel" in r["sampler"] for r in rows)
    summary = capsys.readouterr().out.splitlines()[-1]
    assert "fp64 Gumbel" in summary and "| seed 3 |" in summary


def test_samples_do_not_depend_on_rows_in_flight_or_wave_size(ckpt, tmp_path):
    """Sample i is keyed by (--seed, i): other --rows_in_flight / --wave_size, the same file."""
    def ids(*extra):
        out = tmp_path / "k.jsonl"
        assert sample.main(["--model_path", ckpt, "--tokenizer", "bytes", "--batch_size", "7", "--steps", "6",
                            "--seed", "5", "--out", str(out), "--no_progress", "--device", "cpu", *extra]) == 0
        return [json.loads(line)["ids"] for line in out.read_text().splitlines()]

    assert ids("--rows_in_flight", "2", "--wave_size", "3") == ids("--rows_in_flight", "7") == ids()
    assert ids("--num_samples", "3") == ids()[:3]  # the first samples of a longer run


def test_refresh_every_is_labelled_approximate_everywhere(ckpt, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert sample.main(["--model_path", ckpt, "--tokenizer", "bytes", "--batch_size", "3", "--steps", "8",
                        "--refresh_every", "4", "--seed", "0", "--out", str(out), "--no_progress",
                        "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all("approximate (refresh every 4)" in r["sampler"] for r in rows)
    assert "approximate (refresh every 4)" in capsys.readouterr().out.splitlines()[-1]
    assert sample.main(["--model_path", ckpt, "--tokenizer", "bytes", "--refresh_every", "4", "--loop",
                        "published_api", "--device", "cpu"]) == 2
    assert "--refresh_every (approximate key/value reuse) needs --loop fast" in capsys.readouterr().err


@pytest.mark.parametrize("decoder,para,label", [("confidence", "0.5", "approximate (confidence tau=0.5)"),
                                                ("entropy_bound", "2", "approximate (entropy_bound gamma=2)"),
                                                ("low_confidence", None, "approximate (low_confidence)")])
def test_a_decoder_is_labelled_approximate_everywhere_and_keeps_the_conditioning(ckpt, tmp_path, capsys, decoder,
                                                                                para, label):
    out = tmp_path / "d.jsonl"
    args = ["--model_path", ckpt, "--tokenizer", "bytes", "--batch_size", "4", "--steps", "6", "--rows_in_flight", "3",
            "--decoder", decoder, "--prefix", "ab", "--infill", "9:xy", "--seed", "0", "--out", str(out),
            "--no_progress", "--device", "cpu"] + ([] if para is None else ["--decoder_para", para])
    assert sample.main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(4)) and all(label in r["sampler"] for r in rows)
    assert all(r["ids"][:2] == list(b"ab") and r["ids"][9:11] == list(b"xy") and 1 <= r["enfe"] <= 14 for r in rows)
    assert label in capsys.readouterr().out.splitlines()[-1]


@pytest.mark.parametrize("extra,message", [
    (["--decoder", "beam"], "argument --decoder: invalid choice: 'beam'"),
    (["--decoder_para", "0.9"], "--decoder_para 0.9 needs --decoder (one of confidence, entropy_bound, low_confidence)"),
    (["--decoder", "confidence", "--decoder_para", "0"], "confidence needs decoder_para tau > 0"),
    (["--decoder", "entropy_bound", "--decoder_para", "-1"], "gamma >= 0"),
    (["--decoder", "low_confidence", "--decoder_para", "2"], "low_confidence has no decoder_para"),
    (["--decoder", "confidence", "--loop", "published_api"], "--decoder confidence (an approximate adaptive decoder) "
                                                             "needs --loop fast"),
])
def test_bad_decoder_flags_are_one_line_naming_the_flag(ckpt, capsys, extra, message):
    code = sample.main(["--model_path", ckpt, "--tokenizer", "bytes", "--device", "cpu", "--no_progress"] + extra)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert "--decoder" in err


# ---- ranks: each its own samples, none of another's noise --------------------------------------------------------
@pytest.mark.parametrize("num_samples", [0, 1, 7, 12])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_rank_shares_cover_the_samples_once(num_samples, world):
    """The ranks' (first, count) shares are contiguous, disjoint, in rank order and cover 0 .. N - 1, each
    N / world give or take one."""
    shares = [sample_cli.rank_share(num_samples, DistEnv(rank=r, world=world)) for r in range(world)]
    assert [i for first, count in shares for i in range(first, first + count)] == list(range(num_samples))
    assert max(c for _, c in shares) - min(c for _, c in shares) <= 1


def test_two_ranks_draw_other_samples_with_noise_of_their_own(ckpt, monkeypatch):
    """sample.py's two ranks, run in process one after the other (the collectives answer as one rank alone
    would): they sample with the one seed, and every token of the run draws its own (key, noise id) and
    every sample its own schedule row, ranks together; their samples are other samples (first_index)."""
    log = record_noise(monkeypatch, mask_id=256)  # the checkpoint's: 256 byte tokens, then MASK
    calls = []
    real_generate = sample_cli.generate

    def generate(*args, **kwargs):
        tokens, stats = real_generate(*args, **kwargs)
        calls.append((kwargs["seed"], kwargs["first_index"], tokens))
        return tokens, stats

    monkeypatch.setattr(sample_cli, "generate", generate)
    monkeypatch.setattr(sample_cli, "broadcast_object", lambda obj, env: obj)
    monkeypatch.setattr(sample_cli, "gather_objects", lambda obj, env: [obj] * env.world)
    argv = ["--model_path", ckpt, "--tokenizer", "bytes", "--num_samples", "7", "--steps", "3", "--seed", "4",
            "--rows_in_flight", "2", "--no_progress", "--device", "cpu"]
    for rank in (0, 1):
        run = sample_cli.check_args(sample_cli.build_parser().parse_args(argv))
        assert sample_cli._sample(run, DistEnv(rank=rank, world=2)) == 0
    assert [(seed, first) for seed, first, _ in calls] == [(4, 0), (4, 3)]
    assert [len(tokens) for _, _, tokens in calls] == [3, 4]
    assert_fresh_noise(log, tokens=7 * 16, samples=7, name="two ranks of sample.py")
