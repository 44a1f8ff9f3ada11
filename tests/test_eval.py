"""Zero-shot perplexity: evaluate_ppl (both engines, every loss family) and the eval.py CLI.

A tiny byte-level model (256 tokens + MASK) with perturbed weights and a local text file keep
everything offline and fast. The fast engine runs with the Triton interpreter off,
i.e. the fast backend's PyTorch fallbacks: the kernels have their own tests; here
what is checked is the fast *path* (fused-loss entry point, batched Monte Carlo draws).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from radd_fast import RADD, RADDConfig
from radd_fast.config import ModelConfig
from radd_fast.evaluation import LOSS_TYPES, evaluate_ppl
from radd_fast.noise import get_noise

ROOT = Path(__file__).resolve().parents[1]
L = 16


def tiny_model(seed: int = 0, zero_head: bool = False) -> RADD:
    torch.manual_seed(seed)
    cfg = RADDConfig(tokens=256, model=ModelConfig(hidden_size=32, n_heads=2, n_blocks=1, length=32, dropout=0.0))
    model = RADD(cfg)
    if not zero_head:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def noise(model):
    return get_noise(model.config)


@pytest.fixture
def fast_fallbacks(monkeypatch):
    """The fast backend with its PyTorch fallbacks (the Triton interpreter is far too slow here)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def batches(n: int = 2, b: int = 3, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (b, L), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def eval_cli():
    """The CLI module behind eval.py (in-process: no interpreter start per call)."""
    from radd_fast.evaluation import cli

    return cli


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    tiny_model().save_pretrained(folder / "model")
    text = folder / "text.txt"
    text.write_text("A little text about a quick brown fox and a lazy dog, told twice. " * 6)
    return folder


# -- evaluate_ppl --------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", ["k_DCE", "ar_forward"])
def test_uniform_model_gives_vocab_size(loss_type, noise):
    """A zero-initialised head predicts uniformly over the 256 real tokens: both losses are then exact
    (k_DCE weighs k masked tokens by L/k), so PPL = 256 whatever the draws."""
    res = evaluate_ppl(tiny_model(zero_head=True), noise, batches(), loss_type, 1, progress=False)
    assert res.ppl == pytest.approx(256.0, rel=1e-5)
    assert res.num_batches == 2 and res.num_sequences == 6 and res.length == L


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if not t.startswith("ar_")])
def test_finite_and_reproducible(loss_type, model, noise):
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(evaluate_ppl(model, noise, batches(), loss_type, 2, progress=False))
    assert all(math.isfinite(r.ppl) and r.ppl > 1 for r in runs)
    assert runs[0].batch_losses == runs[1].batch_losses, "same seed must give the same losses"
    assert runs[0].batch_losses != runs[2].batch_losses, "another seed must give other draws"


def test_ar_forward_equals_sum_of_single_positions(model, noise):
    """ar_forward = sum over i of -log p(x_i | x_<i, MASK at i..L-1), computed here one position at a time."""
    (x,) = batches(n=1)
    nll = torch.zeros(x.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for i in range(L):
            xi = x.clone()
            xi[:, i:] = model.mask_id
            logp = model(xi)[:, i, :-1]  # published layout: log-softmax over the real tokens
            nll -= logp.gather(1, x[:, i:i + 1]).squeeze(1).double()
    res = evaluate_ppl(model, noise, [x], "ar_forward", 1, progress=False)
    assert res.mean_loss == pytest.approx(nll.mean().item(), rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(nll.mean().item() / L), rel=1e-5)


def test_fast_engine_matches_reference_on_the_same_draws(model, noise, fast_fallbacks):
    """One draw per forward on both engines: the same random numbers, so the same losses."""
    out = {}
    for backend in ("reference", "fast"):
        m = tiny_model().set_backend(backend)
        torch.manual_seed(3)
        out[backend] = evaluate_ppl(m, noise, batches(), "t_DCE", 3, mc_chunk=1, progress=False)
    assert out["fast"].batch_losses == pytest.approx(out["reference"].batch_losses, rel=1e-5)


def test_batched_draws_equal_the_loop_in_expectation(noise, fast_fallbacks):
    """The fast engine replicates the batch k times per forward; its estimate must have the same mean as
    the published one-draw-per-forward loop. One batch repeated: per-batch values are iid estimates."""
    (x,) = batches(n=1, b=4)
    stats = {}
    for backend, chunk in (("reference", 1), ("fast", 8)):
        m = tiny_model().set_backend(backend)
        torch.manual_seed(11)
        res = evaluate_ppl(m, noise, [x] * 12, "k_DCE", 8, mc_chunk=chunk, progress=False)
        v = torch.tensor(res.batch_losses, dtype=torch.float64)
        stats[backend] = (v.mean().item(), v.var().item() / len(v))
        assert res.mc_per_forward == chunk
    (m_ref, var_ref), (m_fast, var_fast) = stats["reference"], stats["fast"]
    assert abs(m_ref - m_fast) < 4 * math.sqrt(var_ref + var_fast), stats


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-3), (torch.bfloat16, 3e-2)])
def test_fast_engine_on_cuda(noise, dtype, rel):
    """The real kernels (fused masked loss, Triton norms / attention) against the fp32 reference,
    on the same draws; then the default batched-draw path runs and gives a finite PPL."""
    out = {}
    for backend, dt in (("reference", torch.float32), ("fast", dtype)):
        m = tiny_model().to("cuda").set_backend(backend).set_compute_dtype(dt)
        torch.manual_seed(3)
        out[backend] = evaluate_ppl(m, noise.to("cuda"), [b.cuda() for b in batches()], "t_DCE", 3, mc_chunk=1,
                                    progress=False)
    assert out["fast"].batch_losses == pytest.approx(out["reference"].batch_losses, rel=rel)
    res = evaluate_ppl(m, noise.to("cuda"), [b.cuda() for b in batches()], "lambda_DCE", 8, progress=False)
    assert res.mc_per_forward == 8 and math.isfinite(res.ppl)


def test_mc_draws_per_forward_follow_the_token_budget(model, noise, fast_fallbacks):
    m = tiny_model().set_backend("fast")
    res = evaluate_ppl(m, noise, batches(n=1), "lambda_DCE", 5, token_budget=3 * L * 2, progress=False)
    assert res.mc_per_forward == 2  # budget of two replicas of a [3, 16] batch
    ref = evaluate_ppl(model, noise, batches(n=1), "lambda_DCE", 5, progress=False)
    assert ref.mc_per_forward == 1  # reference: the published loop


def test_evaluate_ppl_errors(model, noise):
    with pytest.raises(ValueError, match="unknown loss type 'nope'"):
        evaluate_ppl(model, noise, batches(), "nope", 1, progress=False)
    with pytest.raises(ValueError, match="monte_carlo_timesteps 1"):
        evaluate_ppl(model, noise, batches(), "ar_backward", 4, progress=False)
    with pytest.raises(ValueError, match="no batches"):
        evaluate_ppl(model, noise, [], "lambda_DCE", 1, progress=False)
    with pytest.raises(ValueError, match="exceeds the model's length"):
        evaluate_ppl(model, noise, [torch.zeros(2, 64, dtype=torch.long)], "lambda_DCE", 1, progress=False)


def test_model_mode_is_restored(model, noise):
    m = tiny_model().train()
    evaluate_ppl(m, noise, batches(n=1), "lambda_DCE", 1, progress=False)
    assert m.training


# -- eval.py -------------------------------------------------------------------------------------------
def cli_args(ckpt: Path, tmp_path: Path, *extra) -> list:
    return ["--model_path", str(ckpt / "model"), "--valid_dataset", str(ckpt / "text.txt"), "--batch_size", "4",
            "--length", str(L), "--work_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"),
            "--device", "cpu", "--no_progress", *extra]


def test_cli_end_to_end(checkpoint, tmp_path):
    cmd = [sys.executable, str(ROOT / "eval.py"), *cli_args(checkpoint, tmp_path, "--monte_carlo_timesteps", "2",
                                                             "--seed", "5")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = [s for s in proc.stdout.splitlines() if s.startswith("Evaluation PPL: ")]
    assert line, proc.stdout
    result = json.loads((tmp_path / "out" / "eval_ppl_text_lambda_DCE.json").read_text())
    assert float(line[0].split(": ")[1]) == pytest.approx(result["ppl"])
    assert result["ppl"] == pytest.approx(math.exp(sum(result["batch_losses"]) / len(result["batch_losses"]) / L))
    s = result["settings"]
    assert (s["loss_type"], s["monte_carlo_timesteps"], s["length"], s["seed"], s["engine"], s["tokenizer"]) == \
        ("lambda_DCE", 2, L, 5, "reference", "bytes")
    assert result["num_batches"] == len(result["batch_losses"]) > 0


def test_cli_in_process_seeded_and_engines(checkpoint, tmp_path, eval_cli, fast_fallbacks, capsys):
    args = cli_args(checkpoint, tmp_path, "--loss_type", "t_DCE", "--max_batches", "2")
    assert eval_cli.main(args) == 0
    first = json.loads((tmp_path / "out" / "eval_ppl_text_t_DCE.json").read_text())
    assert eval_cli.main(args + ["--engine", "fast"]) == 0
    fast = json.loads((tmp_path / "out" / "eval_ppl_text_t_DCE.json").read_text())
    assert fast["settings"]["backend"] == "fast" and first["settings"]["backend"] == "reference"
    assert fast["batch_losses"] == pytest.approx(first["batch_losses"], rel=1e-5)  # one draw per forward, same seed
    assert "Evaluation PPL:" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--valid_dataset", "no_such_corpus"], "unknown dataset 'no_such_corpus'"),
    (["--length", "64"], "larger than the model's length 32"),
    (["--loss_type", "bogus"], "unknown loss type 'bogus'"),
    (["--loss_type", "ar_random", "--monte_carlo_timesteps", "3"], "monte_carlo_timesteps 1"),
    (["--model_path", "/no/such/folder"], "no such checkpoint folder"),
])
def test_cli_errors(checkpoint, tmp_path, eval_cli, capsys, extra, message):
    assert eval_cli.main(cli_args(checkpoint, tmp_path) + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_cli_text_shorter_than_one_block(checkpoint, tmp_path, eval_cli, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert eval_cli.main(cli_args(checkpoint, tmp_path) + ["--valid_dataset", str(short)]) == 2
    assert "fewer than one block" in capsys.readouterr().err


def test_cli_two_cpu_ranks_match_one(checkpoint, tmp_path, eval_cli):
    """--ngpus 2 on CPU (gloo): the exact ar_forward loss must not depend on the number of ranks."""
    args = cli_args(checkpoint, tmp_path, "--loss_type", "ar_forward", "--length", "4", "--batch_size", "8",
                    "--max_batches", "1")
    assert eval_cli.main(args) == 0
    one = json.loads((tmp_path / "out" / "eval_ppl_text_ar_forward.json").read_text())
    assert eval_cli.main(args + ["--ngpus", "2"]) == 0
    two = json.loads((tmp_path / "out" / "eval_ppl_text_ar_forward.json").read_text())
    assert two["settings"]["world_size"] == 2 and two["num_batches"] == 2 and one["num_batches"] == 1
    assert two["batch_losses"][0] == pytest.approx(one["batch_losses"][0], rel=1e-6)
