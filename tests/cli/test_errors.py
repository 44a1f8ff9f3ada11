"""Every bad input a new user meets gives one ``error: ...`` line naming the flag or file, exit code 2,
and no traceback, in sample.py, train.py and eval.py; ``--debug`` / ``RADD_DEBUG=1`` shows the traceback.

The scripts run as a user runs them (``python sample.py ...``, ``python train.py ...`` as
subprocesses, started together so that their start-up overlaps); the long list of bad
sample.py inputs also runs in process through the same ``main``. Nothing touches the
network: ``HF_HUB_OFFLINE=1`` everywhere, hub names must fail at once.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from radd_fast.config import ConfigError
from radd_fast.sampling import cli as sample_cli
from tests.support.models import random_head_model
from tests.support.paths import REPO
from tests.support.runs import write_text

ROOT = REPO


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RADD_DEBUG")}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    return env


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("RADD_DEBUG", raising=False)


def _save(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def _edit_config(folder: Path, **model_changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for key, value in model_changes.items():
        if key == "tokens":
            cfg["tokens"] = value
        else:
            cfg["model"][key] = value
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, str]:
    """Tiny checkpoints, good and broken in each way a user meets (d = 32, 16 positions, 256 tokens)."""
    root = tmp_path_factory.mktemp("ckpts")
    good = _save(random_head_model(tokens=256, length=16), root / "good")
    out = {"good": good, "file": good / "config.json", "missing": root / "missing"}

    no_weights = root / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((good / "config.json").read_text())
    out["no_weights"] = no_weights

    out["vocab"] = _save(random_head_model(tokens=256, length=16), root / "vocab")
    _edit_config(out["vocab"], tokens=200)
    out["shape"] = _save(random_head_model(tokens=256, length=16), root / "shape")
    _edit_config(out["shape"], hidden_size=64)
    out["tok_larger"] = _save(random_head_model(tokens=200, length=16), root / "tok_larger")
    out["tok_smaller"] = _save(random_head_model(tokens=300, length=16), root / "tok_smaller")

    out["truncated_st"] = _save(random_head_model(tokens=256, length=16), root / "truncated_st")
    data = (out["truncated_st"] / "model.safetensors").read_bytes()
    (out["truncated_st"] / "model.safetensors").write_bytes(data[: len(data) // 2])
    out["garbage_json"] = _save(random_head_model(tokens=256, length=16), root / "garbage_json")
    (out["garbage_json"] / "config.json").write_text("{tokens: 256,,")

    nan = random_head_model(tokens=256, length=16)
    with torch.no_grad():
        nan.output_layer.linear.weight[0, 0] = float("nan")
    out["nan"] = _save(nan, root / "nan")

    model = random_head_model(tokens=256, length=16)
    state = {"model": model.state_dict(), "ema": {"shadow_params": [p.detach() for p in model.parameters()]}}
    for name, cut in (("empty_pth", 0), ("truncated_pth", 0.5)):
        run = root / name
        (run / ".hydra").mkdir(parents=True)
        (run / "checkpoints-meta").mkdir()
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(model.config.to_dict()))
        torch.save(state, run / "checkpoints-meta" / "checkpoint.pth")
        data = (run / "checkpoints-meta" / "checkpoint.pth").read_bytes()
        (run / "checkpoints-meta" / "checkpoint.pth").write_bytes(data[: int(len(data) * cut)])
        out[name] = run
    return {k: str(v) for k, v in out.items()}


def _assert_one_error_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


# -- sample.py, in process: every bad input -----------------------------------------------------------
BASE = ["--tokenizer", "bytes", "--device", "cpu", "--no_progress", "--steps", "4"]
SAMPLE_CASES = {
    "missing folder": (["--model_path", "{missing}"], ["no such checkpoint folder", "--model_path"]),
    "folder without weights": (["--model_path", "{no_weights}"], ["no weights", "--model_path"]),
    "file as folder": (["--model_path", "{file}"], ["is a file", "--model_path"]),
    "vocab mismatch": (["--model_path", "{vocab}"], ["vocab mismatch", "model.safetensors"]),
    "shape mismatch": (["--model_path", "{shape}"], ["shape mismatch", "model.safetensors"]),
    "tokenizer larger than the model": (["--model_path", "{tok_larger}"], ["256 ids but the model only 200",
                                                                          "--tokenizer"]),
    "tokenizer smaller than the model": (["--model_path", "{tok_smaller}"], ["decodes only 256", "--tokenizer"]),
    "truncated safetensors": (["--model_path", "{truncated_st}"], ["model.safetensors", "truncated or corrupt"]),
    "garbage config.json": (["--model_path", "{garbage_json}"], ["config.json is not valid JSON"]),
    "empty checkpoint.pth": (["--model_path", "{empty_pth}"], ["checkpoint.pth is empty"]),
    "truncated checkpoint.pth": (["--model_path", "{truncated_pth}"], ["checkpoint.pth", "truncated or corrupt"]),
    "NaN weights": (["--model_path", "{nan}"], ["non-finite", "--model_path"]),
    "bad dtype": (["--model_path", "{good}", "--dtype", "fp12"], ["unknown dtype 'fp12'", "--dtype"]),
    "bogus device": (["--model_path", "{good}", "--device", "bogus"], ["unknown device 'bogus'", "--device"]),
    "missing tokenizer folder": (["--model_path", "{good}", "--tokenizer", "/nonexistent/tok"],
                                 ["no such folder", "--tokenizer"]),
    "hub tokenizer offline": (["--model_path", "{good}", "--tokenizer", "gpt2"],
                              ["HF_HUB_OFFLINE is set", "bytes", "--tokenizer"]),
    "hub model offline": (["--model_path", "JingyangOu/radd-t-dce"], ["not in the local Hugging Face cache",
                                                                      "--model_path"]),
    "out in a missing folder": (["--model_path", "{missing}", "--out", "{missing}/s.jsonl"],
                                ["--out", "does not exist"]),  # found before the model is even read
    "out is a folder": (["--model_path", "{good}", "--out", "{good}"], ["--out", "is a folder"]),
    "empty infill text": (["--model_path", "{good}", "--infill", "10:"], ["--infill", "no text"]),
    "negative infill position": (["--model_path", "{good}", "--infill", "-5:x"], ["--infill", ">= 0"]),
    "fractional top_k": (["--model_path", "{good}", "--strategy", "top_k", "--strategy_para", "2.5"],
                         ["--strategy_para", "2.5"]),
    "unknown method": (["--model_path", "{good}", "--method", "ddim"], ["--method", "invalid choice"]),
    "zero rows in flight": (["--model_path", "{good}", "--rows_in_flight", "0"], ["--rows_in_flight"]),
}
if torch.cuda.is_available():
    SAMPLE_CASES.pop("bogus device")
else:
    SAMPLE_CASES["cuda without CUDA"] = (["--model_path", "{good}", "--device", "cuda"],
                                         ["CUDA is not available", "--device"])
    SAMPLE_CASES["cuda graphs without CUDA"] = (["--model_path", "{good}", "--cuda_graphs"],
                                                ["--cuda_graphs needs a CUDA --device"])


@pytest.mark.parametrize("case", sorted(SAMPLE_CASES))
def test_sample_bad_input_is_one_line(ckpts, capsys, case):
    args, needles = SAMPLE_CASES[case]
    code = sample_cli.main(BASE + [a.format(**ckpts) for a in args])
    captured = capsys.readouterr()
    _assert_one_error_line(code, captured.err, *needles)
    assert "sample 0" not in captured.out  # nothing was sampled


def test_a_refused_run_leaves_an_existing_out_file_alone(ckpts, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    out.write_text("earlier samples\n")
    code = sample_cli.main(BASE + ["--model_path", ckpts["vocab"], "--out", str(out)])
    _assert_one_error_line(code, capsys.readouterr().err, "vocab mismatch")
    assert out.read_text() == "earlier samples\n"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write into any folder")
def test_out_in_an_unwritable_folder(ckpts, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code = sample_cli.main(BASE + ["--model_path", ckpts["good"], "--out", str(locked / "s.jsonl")])
    finally:
        locked.chmod(0o700)
    _assert_one_error_line(code, capsys.readouterr().err, "--out", "cannot be written")


def test_out_is_written_and_flushed_per_sample(ckpts, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert sample_cli.main(BASE + ["--model_path", ckpts["good"], "--batch_size", "3", "--rows_in_flight", "2",
                                   "--loop", "published_api", "--out", str(out)]) == 0
    assert [json.loads(line)["index"] for line in out.read_text().splitlines()] == [0, 1, 2]
    assert capsys.readouterr().out.count("E-NFE") == 1


def test_load_model_errors(ckpts):
    from radd_fast import CheckpointError, load_model

    with pytest.raises(CheckpointError, match="needs a hub repo id or a checkpoint folder, got None"):
        load_model(None)
    with pytest.raises(ConfigError, match="unknown device 'bogus'"):
        load_model(ckpts["good"], device="bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            load_model(ckpts["good"], device="cuda")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_model(ckpts["garbage_json"])


# -- the scripts as a user runs them (subprocesses, started together) -------------------------------------
@pytest.fixture(scope="module")
def script_runs(ckpts, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("scripts")
    text = write_text(tmp)
    train_common = ["model=tiny", "tokenizer=bytes", "tokens=256", f"data.train={text}", f"data.valid={text}",
                    f"data.cache_dir={tmp / 'cache'}", "model.length=16", "training.batch_size=2",
                    "training.accum=1", "training.n_iters=1", "training.eval_freq=0",
                    "training.snapshot_sampling=false", "training.progress=false", f"hydra.run.dir={tmp / 'run'}"]
    sample_common = ["--tokenizer", "bytes", "--device", "cpu", "--no_progress", "--steps", "4"]
    commands = {
        "sample: missing model folder": ["sample.py", "--model_path", ckpts["missing"], *sample_common],
        "sample: truncated safetensors": ["sample.py", "--model_path", ckpts["truncated_st"], *sample_common],
        "sample: bogus device": ["sample.py", "--model_path", ckpts["good"], *sample_common, "--device", "bogus"],
        "sample: negative infill": ["sample.py", "--model_path", ckpts["good"], *sample_common, "--infill", "-5:x"],
        "sample: out folder missing": ["sample.py", "--model_path", ckpts["good"], *sample_common,
                                       "--out", str(tmp / "nope" / "s.jsonl")],
        "sample: --debug": ["sample.py", "--model_path", ckpts["missing"], *sample_common, "--debug"],
        "sample: --cuda_graphs without CUDA": ["sample.py", "--model_path", ckpts["good"], *sample_common,
                                               "--cuda_graphs"],
        "sample: --no_cuda_graphs, as that error says": ["sample.py", "--model_path", ckpts["good"], *sample_common,
                                                         "--no_cuda_graphs"],
        "sample: --strategy_para with direct": ["sample.py", "--model_path", ckpts["good"], *sample_common,
                                                "--strategy", "direct", "--strategy_para", "0.5"],
        "eval: --monte_carlo_timesteps 0": ["eval.py", "--model_path", ckpts["good"], "--valid_dataset", str(text),
                                            "--device", "cpu", "--work_dir", str(tmp / "eval"),
                                            "--monte_carlo_timesteps", "0"],
        "eval: --cuda_graphs without --static_rows": ["eval.py", "--model_path", ckpts["good"], "--valid_dataset",
                                                      str(text), "--device", "cpu", "--work_dir", str(tmp / "eval"),
                                                      "--cuda_graphs"],
        "train: unknown override key": ["train.py", *train_common, "training.batchsize=4"],
        "train: optim.lr=nan": ["train.py", *train_common, "optim.lr=nan"],
        "train: missing data.train": ["train.py", *train_common, f"data.train={tmp / 'nope.txt'}"],
        "train: bad load_dir": ["train.py", *train_common, f"load_dir={tmp / 'no_run'}"],
        "train: batch does not split": ["train.py", *train_common, "training.batch_size=6", "training.accum=4"],
        # a flag none of them knows, and a flag without its value: the same one line from each parser
        "sample: unknown flag": ["sample.py", "--bogus"],
        "eval: unknown flag": ["eval.py", "--bogus"],
        "train: unknown flag": ["train.py", "--bogus"],
        "sample: flag without its value": ["sample.py", "--seed"],
        "eval: flag without its value": ["eval.py", "--seed"],
        "train: flag without its value": ["train.py", "--config-name"],
    }
    procs = {name: subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, cmd in commands.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


@pytest.mark.parametrize("name,needles", [
    ("sample: missing model folder", ["no such checkpoint folder", "--model_path"]),
    ("sample: truncated safetensors", ["model.safetensors", "truncated or corrupt"]),
    ("sample: bogus device", ["unknown device 'bogus'", "--device"]),
    ("sample: negative infill", ["--infill", ">= 0"]),
    ("sample: out folder missing", ["--out", "does not exist"]),
    ("sample: --cuda_graphs without CUDA", ["--cuda_graphs needs a CUDA --device"]),
    ("eval: --cuda_graphs without --static_rows", ["--cuda_graphs: cuda_graphs=True needs --static_rows"]),
    ("train: unknown override key", ["unknown config key 'training.batchsize'"]),
    ("train: optim.lr=nan", ["optim.lr must be finite"]),
    ("train: missing data.train", ["data.train=", "no such file"]),
    ("train: bad load_dir", ["load_dir=", "no such folder"]),
    ("train: batch does not split", ["training.batch_size = 6", "not divisible"]),
])
def test_scripts_print_one_error_line(script_runs, name, needles):
    result = script_runs[name]
    _assert_one_error_line(result.returncode, result.stderr, *needles)


@pytest.mark.parametrize("kind, line", [
    ("unknown flag", "error: unrecognized arguments: --bogus"),
    ("flag without its value", "error: argument {flag}: expected one argument"),
])
def test_a_bad_flag_is_the_same_one_line_in_every_script(script_runs, kind, line):
    """One raising parser (errors.ArgParser) for the three CLIs: no usage block, the same line, exit 2
    (eval.py printed 19 lines of usage, train.py Hydra's 8)."""
    flags = {"sample": "--seed", "eval": "--seed", "train": "--config-name/-cn"}
    for script, flag in flags.items():
        result = script_runs[f"{script}: {kind}"]
        assert (result.returncode, result.stderr.splitlines()) == (2, [line.format(flag=flag)]), (script, result.stderr)
        assert result.stdout == ""


@pytest.mark.parametrize("name, line", [
    ("sample: --strategy_para with direct", "error: --strategy_para 0.5 does nothing with --strategy direct (it is p "
     "for top_p, k for top_k): pass --strategy top_p or top_k, or drop --strategy_para"),
    ("eval: --monte_carlo_timesteps 0", "error: --monte_carlo_timesteps must be >= 1, got 0"),
])
def test_a_flag_that_would_mean_something_else_is_one_exact_line(script_runs, name, line):
    """--strategy_para is ignored by direct and 0 draws used to mean 1024: both refused, not reinterpreted."""
    result = script_runs[name]
    assert (result.returncode, result.stderr.splitlines()) == (2, [line])


def test_the_spelling_an_error_suggests_is_accepted(script_runs):
    """sample.py's --cuda_graphs error says to pass --no_cuda_graphs (documented in README and --help): it runs."""
    assert "or pass --no_cuda_graphs" in script_runs["sample: --cuda_graphs without CUDA"].stderr
    result = script_runs["sample: --no_cuda_graphs, as that error says"]
    assert result.returncode == 0 and "E-NFE" in result.stdout, result.stderr


def test_debug_shows_the_traceback(script_runs):
    result = script_runs["sample: --debug"]
    assert result.returncode != 0 and "Traceback" in result.stderr and "CheckpointError" in result.stderr


# -- malformed data: train.py and eval.py as subprocesses, each bad file one line before any work ----------
JSONL_FIX = 'each line must be one JSON object such as {"text": "..."}'
DATA_FILES = {  # name -> (bytes, the error message after "<path>" / "<path>:<line>")
    "latin1.txt": ("first line\ncaf\xe9 au lait\n".encode("latin-1"),
                   " is not UTF-8 (byte 0xe9 at byte offset 14, line 2): convert it with iconv -f <its encoding> -t "
                   "utf-8, e.g. iconv -f cp1252 -t utf-8 {path} > {stem}.utf8.txt for Western-European text"),
    "binary.txt": (b"\x7fELF\x02\x01\x01\x00" * 16,
                   " is binary data, not text (byte 0x00 at byte offset 7): pass UTF-8 text (.txt / .jsonl), or "
                   "token ids as .npy or raw uint16 .bin"),
    "cut.jsonl": (b'{"text": "a first document"}\n{"text": "cut\n',
                  ':2: not valid JSON (Unterminated string starting, column 10): ' + JSONL_FIX),
    "number.jsonl": (b'{"text": "a first document"}\n42\n', ":2: a JSON number, not an object: " + JSONL_FIX),
    "field.jsonl": (b'{"text": "a first document"}\n{"body": "x"}\n',
                    ":2: the object has no 'text' field (its keys: ['body']): " + JSONL_FIX),
    "odd.bin": (bytes(range(64)) + b"\x01",
                ": 65 bytes is not a whole number of token ids (a .bin file is raw uint16, 2 bytes per id; the last "
                "byte, at offset 64, is left over): a truncated copy? copy or write it again, or save ids of another "
                "dtype as .npy"),
    "wide.bin": (b"\x01\x00" * 40 + b"\x00\x01" + b"\x02\x00" * 40,  # id 256 at token 40
                 ": token id 256 (token 40, byte offset 80) is outside the ids of tokenizer 'bytes', [0, 256): "
                 "tokenised with another tokenizer? pass that one (tokenizer= / --tokenizer)"),
}
EVAL_DATA = ("latin1.txt", "number.jsonl", "odd.bin", "wide.bin")


@pytest.fixture(scope="module")
def data_runs(ckpts, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    tmp = tmp_path_factory.mktemp("bad_data")
    text = write_text(tmp)
    commands = {}
    for name, (content, _) in DATA_FILES.items():
        (tmp / name).write_bytes(content)
        run = tmp / f"run_{name}"
        commands[f"train {name}"] = (["train.py", "model=tiny", "tokenizer=bytes", "tokens=256",
                                      f"data.train={tmp / name}", f"data.valid={text}",
                                      f"data.cache_dir={tmp / f'cache_{name}'}", "model.length=16",
                                      "training.batch_size=2", "training.accum=1", "training.n_iters=1",
                                      "training.eval_freq=0", "training.snapshot_sampling=false",
                                      "training.progress=false", f"hydra.run.dir={run}"], run)
    for name in EVAL_DATA:
        work = tmp / f"eval_{name}"
        commands[f"eval {name}"] = (["eval.py", "--model_path", ckpts["good"], "--valid_dataset", str(tmp / name),
                                     "--tokenizer", "bytes", "--device", "cpu", "--work_dir", str(work),
                                     "--cache_dir", str(tmp / f"cache_{name}"), "--no_progress"], work)
    (tmp / "samples.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    commands["eval --gen_ppl samples.jsonl"] = (["eval.py", "--gen_ppl", str(tmp / "samples.jsonl"), "--scorer",
                                                 str(tmp / "no_scorer"), "--work_dir", str(tmp / "gen"),
                                                 "--device", "cpu", "--no_progress"], tmp / "gen")
    procs = {name: subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, (cmd, _) in commands.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err), commands[name][1])
    return results, tmp


@pytest.mark.parametrize("run", [f"train {name}" for name in DATA_FILES] + [f"eval {name}" for name in EVAL_DATA])
def test_a_malformed_data_file_is_one_line_naming_it_and_where(data_runs, run):
    """train.py and eval.py: the file, the line or byte offset and the fix in one line, exit 2, before any
    model work (no training step, no checkpoint, no evaluation, no token cache)."""
    results, tmp = data_runs
    result, out_dir = results[run]
    name = run.split(" ", 1)[1]
    path = tmp / name
    expected = f"error: {path}" + DATA_FILES[name][1].replace("{path}", str(path)).replace("{stem}", str(tmp / path.stem))
    assert (result.returncode, result.stderr.splitlines()) == (2, [expected]), result.stderr
    assert "training step" not in result.stdout and "Evaluation PPL" not in result.stdout
    assert not list(out_dir.rglob("*.pth")) and not list(out_dir.rglob("*.json"))
    assert not list((tmp / f"cache_{name}").glob("*.bin*"))


def test_a_samples_file_not_utf8_is_one_line_naming_its_line(data_runs):
    results, tmp = data_runs
    result, _ = results["eval --gen_ppl samples.jsonl"]
    path = tmp / "samples.jsonl"
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"error: {path}:2: not UTF-8 (byte 0xe9 at byte offset 30): convert it with iconv -f <its encoding> -t utf-8, "
        f"e.g. iconv -f cp1252 -t utf-8 {path} > {tmp / 'samples.utf8.jsonl'} for Western-European text"]


# -- every flag the README and docs/*.md name is accepted by its CLI -----------------------------------------------------
FLAG = re.compile(r"(?<![\w-])--[a-zA-Z][\w-]*")
ARGS = r"((?:[ \t]+(?:\"[^\"]*\"|'[^']*'|[^\s`#;|)]+))*)"  # a command's arguments, up to a comment or a backtick
CLI_COMMAND = re.compile(r"\b(sample|eval|train)\.py" + ARGS)
# Commands of other tools in the docs (torchrun, the benchmarks, tools/, lm_eval, pip, make): their flags are theirs.
OTHER_COMMAND = re.compile(r"(?:python\s+-m\s+[\w.]+|python\s+(?:tools|benchmarks)/\S+|bash\s+\S+|lm_eval|make|pip|"
                           r"pytest|torchrun)" + ARGS)
# Flags of other tools that the prose names outside a command, with the tool (nothing else may be unknown).
OTHER_TOOLS = {"--nnodes": "torchrun", "--node_rank": "torchrun", "--rdzv_endpoint": "torchrun",
               "--sizes": "benchmarks/bench_*.py", "--sweep": "benchmarks/bench_*.py", "--dry-run": "benchmarks/gpu_check",
               "--max_batch_size": "lm_eval", "--families": "tools/aot_build.py", "--jobs": "tools/aot_build.py",
               "--resources-from": "tools/aot_build.py", "--workdir": "tools/mutate.py", "--report": "tools/mutate.py"}
DEBUG = "--debug"  # every CLI takes it (errors.run_cli strips it before parsing)


def _documents() -> dict[str, str]:
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    return {f.name: f.read_text(encoding="utf-8").replace("\\\n", " ") for f in files}  # continuation lines joined


def _parsers() -> dict:
    from radd_fast.evaluation.cli import build_parser as eval_parser
    from radd_fast.training.cli import build_parser as train_parser

    return {"sample": sample_cli.build_parser(), "eval": eval_parser(), "train": train_parser()}


LINE_START = re.compile(r"^\s*(?:\$\s*)?(?:python|torchrun\b.*)\s+$")  # what precedes a command on a code line


def _documented_commands() -> list[tuple[str, str, str, bool]]:
    """(document, CLI, arguments, whole) of every sample.py / eval.py / train.py command in the docs; whole:
    a code line as a user types it (``python eval.py ...``), not a fragment of prose (``--refresh_every R``)."""
    out = []
    for name, text in _documents().items():
        for m in CLI_COMMAND.finditer(text):
            before = text[text.rfind("\n", 0, m.start()) + 1:m.start()]
            out.append((name, m.group(1), m.group(2), bool(LINE_START.match(before))))
    return out


class TestDocumentedFlags:
    """The README, --help and docs/EVALUATION.md named --no_cuda_graphs and --no_mc_batching, which
    did not exist: every flag the docs name now parses, in its CLI when it is part of a command."""

    def test_the_docs_name_commands_of_every_cli(self):
        whole = {cli for _, cli, _, is_whole in _documented_commands() if is_whole}
        assert whole == {"sample", "eval", "train"}

    def test_every_flag_of_a_documented_command_is_its_clis(self):
        parsers = _parsers()
        unknown = [(doc, cli, flag) for doc, cli, args, _ in _documented_commands() for flag in FLAG.findall(args)
                   if flag != DEBUG and flag not in parsers[cli]._option_string_actions]
        assert not unknown, unknown

    def test_every_documented_command_line_parses(self):
        """A whole command as the docs write it (a code line, not a prose fragment with placeholders):
        sample.py / eval.py through their parsers, train.py through Hydra's flags and the composed config."""
        from radd_fast.training import cli as train_cli

        parsers = _parsers()
        whole = [(cli, args) for _, cli, args, is_whole in _documented_commands() if is_whole]
        assert len(whole) >= 10
        for cli, args in whole:
            argv = shlex.split(args)
            if cli == "train":
                parsers[cli].parse_args(argv)
                train_cli.check_overrides(train_cli.task_overrides(argv))
            else:
                parsers[cli].parse_args(argv)

    def test_every_flag_the_prose_names_is_accepted_by_a_cli(self):
        """Outside commands: a flag of sample.py, eval.py or train.py, or of a tool whose command the docs show."""
        accepted = set().union(*(set(p._option_string_actions) for p in _parsers().values()), {DEBUG}, OTHER_TOOLS)
        for text in _documents().values():
            for m in OTHER_COMMAND.finditer(text):
                accepted |= set(FLAG.findall(CLI_COMMAND.split(m.group(1))[0]))
        unknown = sorted({(doc, flag) for doc, text in _documents().items() for flag in FLAG.findall(text)
                          if flag not in accepted})
        assert not unknown, unknown

    @pytest.mark.parametrize("cli, flags, dest, value", [
        ("sample", ["--no_cuda_graphs"], "cuda_graphs", False), ("sample", ["--no-cuda_graphs"], "cuda_graphs", False),
        ("sample", ["--cuda_graphs"], "cuda_graphs", True), ("sample", [], "cuda_graphs", None),
        ("eval", ["--no_mc_batching"], "mc_batching", False), ("eval", ["--no-mc_batching"], "mc_batching", False),
        ("eval", ["--mc_batching"], "mc_batching", True), ("eval", ["--no_cuda_graphs"], "cuda_graphs", False),
    ])
    def test_both_spellings_of_an_off_switch(self, cli, flags, dest, value):
        assert getattr(_parsers()[cli].parse_args(flags), dest) is value
