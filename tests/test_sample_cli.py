"""sample.py end to end on a saved checkpoint with the byte tokenizer."""
import json

import pytest

import sample

from .test_sampling_utils import tiny_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    tiny_model(tokens=256, length=16).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("engine,method,strategy", [("fast", "tweedie", "direct"), ("reference", "euler", "top_p"),
                                                    ("fast", "ordered", "top_k")])
def test_cli_writes_jsonl_with_the_conditioning(ckpt, tmp_path, capsys, engine, method, strategy):
    out = tmp_path / "s.jsonl"
    args = ["--model_path", ckpt, "--tokenizer", "bytes", "--batch_size", "3", "--num_samples", "5",
            "--steps", "8", "--method", method, "--strategy", strategy, "--prefix", "ab", "--suffix", "yz",
            "--infill", "6:mid", "--seed", "0", "--engine", engine, "--out", str(out), "--no_progress",
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
    with pytest.raises(SystemExit) as e:
        sample.main(["--model_path", ckpt, "--tokenizer", "bytes", "--device", "cpu", "--no_progress"] + extra)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
