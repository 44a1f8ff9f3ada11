"""Zero-shot perplexity: evaluate_ppl (both backends, with and without Monte Carlo batching, every
loss family) and the eval.py CLI.

A tiny byte-level model (256 tokens + MASK) with perturbed weights and a local text file keep
everything offline and fast. The fast backend runs with the Triton interpreter off,
i.e. its PyTorch fallbacks: the kernels have their own tests; here what is checked
is the fast *path* (fused-loss entry point) and the batched Monte Carlo draws.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from radd_fast import RADD, RADDConfig
from radd_fast.config import ModelConfig
from radd_fast.evaluation import LOSS_TYPES, NonFiniteLoss, cli, evaluate_ppl
from radd_fast.losses import get_loss_fn
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


def test_fast_backend_matches_reference_on_the_same_draws(model, noise, fast_fallbacks):
    """One draw per forward on both engines: the same random numbers, so the same losses."""
    out = {}
    for backend in ("reference", "fast"):
        m = tiny_model().set_backend(backend)
        torch.manual_seed(3)
        out[backend] = evaluate_ppl(m, noise, batches(), "t_DCE", 3, mc_chunk=1, progress=False)
    assert out["fast"].batch_losses == pytest.approx(out["reference"].batch_losses, rel=1e-5)


def test_batched_draws_equal_the_loop_in_expectation(noise, fast_fallbacks):
    """Monte Carlo batching replicates the batch k times per forward; its estimate must have the same mean as
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
def test_fast_backend_on_cuda(noise, dtype, rel):
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
    res = evaluate_ppl(m, noise, batches(n=1), "lambda_DCE", 5, mc_batching=True, token_budget=3 * L * 2,
                       progress=False)
    assert res.mc_per_forward == 2  # budget of two replicas of a [3, 16] batch
    ref = evaluate_ppl(model, noise, batches(n=1), "lambda_DCE", 5, progress=False)
    assert ref.mc_per_forward == 1  # default on CPU: the published loop


def test_mc_batching_is_an_option_not_the_backend(model, noise, fast_fallbacks):
    """Batching follows mc_batching (default: on for CUDA only), never the kernel backend."""
    fast = tiny_model().set_backend("fast")
    assert evaluate_ppl(fast, noise, batches(n=1), "lambda_DCE", 4, progress=False).mc_per_forward == 1
    on = evaluate_ppl(model, noise, batches(n=1), "lambda_DCE", 4, mc_batching=True, progress=False)
    assert model.backend == "reference" and on.mc_per_forward == 4
    exact = evaluate_ppl(model, noise, batches(n=1), "ar_forward", 1, mc_batching=True, progress=False)
    assert exact.mc_per_forward == 1


@pytest.mark.parametrize("mc_batching", [False, True])
def test_batched_and_looped_draws_give_the_closed_form(noise, mc_batching):
    """A zero output layer predicts uniformly over the 256 real tokens, so every masked token costs
    log 256. k_DCE masks exactly k tokens and weighs them L/k: each draw is exactly L log 256, so
    PPL = 256 whatever the draws, batched or not, with a zero Monte Carlo variance. lambda_DCE
    weighs the masked tokens by 1/lambda: its expectation is L log 256 (PPL 256), its draws vary,
    so the estimate must be within a few of its own standard errors of 256."""
    m = tiny_model(zero_head=True)
    torch.manual_seed(0)
    k = evaluate_ppl(m, noise, batches(n=2, b=4), "k_DCE", 4, mc_batching=mc_batching, token_budget=2 * 4 * L,
                     progress=False)
    assert k.mc_per_forward == (2 if mc_batching else 1)
    assert k.ppl == pytest.approx(256.0, rel=1e-6)
    assert k.ppl_stderr < 1e-4  # float32 rounding of the per-draw losses only
    lam = evaluate_ppl(m, noise, batches(n=2, b=4), "lambda_DCE", 6, mc_batching=mc_batching, progress=False)
    assert lam.mc_per_forward == (6 if mc_batching else 1)
    assert lam.ppl_stderr > 100 * k.ppl_stderr and abs(lam.ppl - 256.0) < 5 * lam.ppl_stderr, (lam.ppl, lam.ppl_stderr)


def test_stderr_matches_an_independent_computation(model, noise):
    """The published loop by hand, one draw at a time with the same seed: per-batch means, the
    spread of the draws, and the delta-method standard error of exp(mean / L)."""
    data, mc = batches(n=3), 5
    torch.manual_seed(7)
    res = evaluate_ppl(model, noise, data, "lambda_DCE", mc, mc_batching=False, progress=False)
    loss_fn = get_loss_fn(noise, model.vocab_size, train=False, loss_type="lambda_DCE")
    torch.manual_seed(7)
    means, variances = [], []
    with torch.no_grad():
        for x in data:
            draws = np.array([loss_fn(model, x).double().mean().item() for _ in range(mc)])
            means.append(draws.mean())
            variances.append(draws.var(ddof=1) / mc)
    assert res.batch_losses == pytest.approx(means, rel=1e-9)
    ppl = math.exp(np.mean(means) / L)
    se = ppl * math.sqrt(np.sum(variances) / len(means) ** 2) / L
    assert res.ppl == pytest.approx(ppl, rel=1e-9) and res.ppl_stderr == pytest.approx(se, rel=1e-6)


def test_nan_weights_raise_instead_of_a_nan_ppl(noise):
    m = tiny_model()
    with torch.no_grad():
        m.output_layer.linear.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLoss, match="batch 0 is nan"):
        evaluate_ppl(m, noise, batches(), "lambda_DCE", 2, progress=False)


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
    assert (s["loss_type"], s["monte_carlo_timesteps"], s["length"], s["seed"], s["backend"], s["tokenizer"]) == \
        ("lambda_DCE", 2, L, 5, "reference", "bytes")
    assert (s["split"], s["mc_batching"], s["batch_size"]) == ("test", False, 4)
    assert result["num_batches"] == len(result["batch_losses"]) > 0
    n_blocks = len((checkpoint / "text.txt").read_bytes()) // L  # one document + EOS, cut into blocks
    assert f"split test, {n_blocks} blocks of {L} tokens; evaluating {n_blocks} blocks in " in proc.stdout
    assert result["num_sequences"] == n_blocks and result["ppl_stderr"] > 0


def test_cli_nan_weights_fail_in_one_line(checkpoint, tmp_path):
    """As a user meets it (a subprocess): a NaN checkpoint gives no 'Evaluation PPL: nan' but one error
    line, exit code 2, no traceback."""
    bad = tiny_model()
    with torch.no_grad():
        bad.blocks[0].attn_qkv.weight.fill_(float("nan"))
    bad.save_pretrained(tmp_path / "nan_model")
    args = cli_args(checkpoint, tmp_path, "--monte_carlo_timesteps", "2")
    args[args.index("--model_path") + 1] = str(tmp_path / "nan_model")
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    err_lines = proc.stderr.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("error: the loss of batch 0 is nan"), proc.stderr
    assert "not finite" in err_lines[0] and "Traceback" not in proc.stderr and "Evaluation PPL" not in proc.stdout


def test_cli_unwritable_work_dir_is_refused_before_evaluating(checkpoint, tmp_path, eval_cli, capsys, monkeypatch):
    (tmp_path / "a_file").write_text("not a folder")
    args = cli_args(checkpoint, tmp_path, "--monte_carlo_timesteps", "2")
    args[args.index("--work_dir") + 1] = str(tmp_path / "a_file" / "out")
    monkeypatch.setattr(eval_cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded first"))
    assert eval_cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write results to --work_dir {tmp_path / 'a_file' / 'out'}"), err


def test_cli_in_process_seeded_and_backends(checkpoint, tmp_path, eval_cli, fast_fallbacks, capsys):
    args = cli_args(checkpoint, tmp_path, "--loss_type", "t_DCE", "--max_batches", "2", "--monte_carlo_timesteps", "1")
    assert eval_cli.main(args) == 0
    first = json.loads((tmp_path / "out" / "eval_ppl_text_t_DCE.json").read_text())
    assert eval_cli.main(args + ["--backend", "fast"]) == 0
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
    (["--engine", "fast"], "use --backend reference|fast for the kernels and --mc_batching"),
    (["--batch_size", "5", "--ngpus", "2"], "--batch_size 5 (the global batch) is not divisible by --ngpus 2"),
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
    args = cli_args(checkpoint, tmp_path, "--loss_type", "ar_forward", "--length", "4")
    assert eval_cli.main(args + ["--batch_size", "4", "--max_batches", "2"]) == 0
    one = json.loads((tmp_path / "out" / "eval_ppl_text_ar_forward.json").read_text())
    # --batch_size is the GLOBAL batch: 8 over 2 ranks is 4 per rank, the same batches as above
    assert eval_cli.main(args + ["--batch_size", "8", "--max_batches", "1", "--ngpus", "2"]) == 0
    two = json.loads((tmp_path / "out" / "eval_ppl_text_ar_forward.json").read_text())
    assert two["settings"]["world_size"] == 2 and two["num_batches"] == 2 and one["num_batches"] == 2
    assert two["batch_losses"] == pytest.approx(one["batch_losses"], rel=1e-6)
    assert two["num_sequences"] == one["num_sequences"] == 8


@pytest.mark.parametrize("mc_batching", [False, True])
def test_static_rows_give_the_closed_form_too(noise, mc_batching):
    """The training step's static-capacity masked rows (same law, other random stream): k_DCE exactly
    L log 256 per draw, lambda_DCE within its own standard errors of 256."""
    m = tiny_model(zero_head=True)
    torch.manual_seed(0)
    k = evaluate_ppl(m, noise, batches(n=2, b=4), "k_DCE", 4, mc_batching=mc_batching, token_budget=2 * 4 * L,
                     static_rows=True, progress=False)
    assert k.ppl == pytest.approx(256.0, rel=1e-6)
    lam = evaluate_ppl(m, noise, batches(n=2, b=4), "lambda_DCE", 6, mc_batching=mc_batching, static_rows=True,
                       progress=False)
    assert abs(lam.ppl - 256.0) < 5 * lam.ppl_stderr, (lam.ppl, lam.ppl_stderr)


def test_static_rows_estimate_the_eager_loss(model, noise):
    """On a model with a real head the static-row and eager estimates agree within their errors."""
    torch.manual_seed(3)
    eager = evaluate_ppl(model, noise, batches(n=2), "t_DCE", 16, mc_batching=True, progress=False)
    static = evaluate_ppl(model, noise, batches(n=2), "t_DCE", 16, mc_batching=True, static_rows=True,
                          progress=False)
    spread = 5 * (eager.ppl_stderr ** 2 + static.ppl_stderr ** 2) ** 0.5
    assert abs(eager.ppl - static.ppl) < spread, (eager.ppl, static.ppl, spread)


@pytest.mark.parametrize("extra,needle", [(["--device", "foo"], "unknown device 'foo'"),
                                          (["--device", "cuda:7"], "--device"),
                                          (["--max_batches", "0"], "--max_batches must be >= 1"),
                                          (["--token_budget", "-1"], "--token_budget must be >= 1"),
                                          (["--cuda_graphs"], "--cuda_graphs: cuda_graphs=True needs --static_rows"),
                                          (["--cuda_graphs", "--static_rows", "--device", "cpu"],
                                           "--cuda_graphs: cuda_graphs=True needs a CUDA device")])
def test_cli_bad_counts_and_devices_are_one_line_before_the_model(checkpoint, tmp_path, eval_cli, capsys,
                                                                  monkeypatch, extra, needle):
    args = cli_args(checkpoint, tmp_path, "--monte_carlo_timesteps", "2", *extra)
    monkeypatch.setattr(eval_cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded first"))
    assert eval_cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
