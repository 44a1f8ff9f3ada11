"""The lm-evaluation-harness door (radd_fast/integrations/lm_eval.py), offline: local tasks (YAML + JSONL)
run through ``lm_eval.simple_evaluate``; every log-likelihood the harness received equals our own
functions' on the same tokens, every bad argument is one line naming it."""
import json
import math
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an optional extra: pip install -e '.[eval]'")
import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from radd_fast import load_model  # noqa: E402
from radd_fast.errors import UserError  # noqa: E402
from radd_fast.evaluation import evaluate_ppl  # noqa: E402
from radd_fast.integrations.likelihood import (  # noqa: E402
    left_to_right_log_likelihood,
    monte_carlo_log_likelihood,
    request_seed,
)
from radd_fast.integrations.lm_eval import RADDLM, AdapterError  # noqa: E402
from radd_fast.sampling import generate  # noqa: E402
from tests.support.lm_eval_tasks import write_byte_checkpoint, write_tasks  # noqa: E402
from tests.support.paths import REPO  # noqa: E402

SEED, MC, STEPS = 3, 4, 8


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    return SimpleNamespace(tasks=write_tasks(root), model=write_byte_checkpoint(root / "model"), root=root)


def _evaluate(folders, tasks, **model_args):
    args = {"pretrained": str(folders.model), "seed": SEED, "mc": MC, "steps": STEPS, **model_args}
    return lm_eval.simple_evaluate(model="radd", model_args=args, tasks=tasks, bootstrap_iters=0, log_samples=True,
                                   task_manager=TaskManager(include_path=str(folders.tasks)))


@pytest.fixture(scope="module")
def results(folders):
    """One harness run of the three tasks (exact likelihood, windows one per batch)."""
    return _evaluate(folders, ["tiny_lambada", "tiny_rolling", "tiny_generate"], batch_size=1)


def _pair(context: str, continuation: str):
    """The byte tokens the adapter scores: the context's trailing spaces move to the continuation."""
    stripped = context.rstrip()
    return list(stripped.encode()), list((context[len(stripped):] + continuation).encode())


def test_loglikelihood_is_the_exact_left_to_right_likelihood(folders, results):
    samples = results["samples"]["tiny_lambada"]
    pairs = [_pair(*s["arguments"][0]) for s in samples]
    model, _ = load_model(folders.model)
    want = left_to_right_log_likelihood(model, pairs)
    got = [tuple(s["resps"][0][0]) for s in samples]
    assert [g for _, g in got] == [g for _, g in want]
    torch.testing.assert_close([v for v, _ in got], [v for v, _ in want], rtol=0, atol=1e-5)
    metrics = results["results"]["tiny_lambada"]
    assert metrics["perplexity,none"] == pytest.approx(math.exp(-sum(v for v, _ in want) / len(want)), rel=1e-5)
    assert metrics["acc,none"] == sum(g for _, g in want) / len(want)
    assert "left to right" in results["config"]["radd"]["loglikelihood"]


def test_loglikelihood_elbo_is_the_monte_carlo_likelihood(folders, results):
    """The same requests as the harness run's, asked of an adapter with likelihood=elbo directly."""
    requests = [SimpleNamespace(args=tuple(s["arguments"][0])) for s in results["samples"]["tiny_lambada"]]
    lm = RADDLM(pretrained=str(folders.model), likelihood="elbo", mc=MC, seed=SEED)
    got = lm.loglikelihood(requests)
    model, _ = load_model(folders.model)
    pairs = [_pair(*r.args) for r in requests]
    torch.testing.assert_close([v for v, _ in got], monte_carlo_log_likelihood(model, pairs, MC, SEED), rtol=0, atol=1e-5)
    assert [g for _, g in got] == [g for _, g in left_to_right_log_likelihood(model, pairs)]  # greedy: left to right
    assert f"ELBO of the continuation given the context, {MC} draws" in lm.get_model_info()["radd"]["loglikelihood"]


def test_loglikelihood_rolling_is_evaluate_ppl_over_windows_of_the_model_length(folders, results):
    """Each text: its windows of L = 32 bytes (one per batch here), the partial last one at its own
    length, each scored by evaluate_ppl under the text's own seed; summed and negated."""
    model, noise = load_model(folders.model)
    samples = results["samples"]["tiny_rolling"]
    assert len(samples) == 3
    for sample in samples:
        ids = list(sample["arguments"][0][0].encode())
        windows = [torch.tensor([ids[i:i + 32]]) for i in range(0, len(ids), 32)]
        runs = [[w for w in windows if w.shape[1] == 32], [w for w in windows if w.shape[1] < 32]]
        total = 0.0
        with torch.random.fork_rng():
            torch.manual_seed(request_seed(SEED, ids))
            for batches in filter(None, runs):
                res = evaluate_ppl(model, noise, batches, "lambda_DCE", MC, progress=False)
                total += sum(res.batch_losses)
        assert sample["resps"][0][0] == -total
    assert "lambda_DCE over 4 draws, windows of 32 tokens" in results["config"]["radd"]["loglikelihood_rolling"]


def test_generate_until_samples_the_engine_with_the_context_as_prefix(folders, results):
    model, noise = load_model(folders.model)
    samples = results["samples"]["tiny_generate"]
    contexts = [list(s["arguments"][0][0].encode()) for s in samples]
    cond = torch.full((len(contexts), 32), model.mask_id)
    for r, ctx in enumerate(contexts):
        cond[r, :len(ctx)] = torch.tensor(ctx)
    tokens, _ = generate(model, noise, len(contexts), 32, STEPS, conditioning=cond, progress=False,
                         seed=request_seed(SEED, "generate", contexts), strategy="top_k", strategy_para=1)
    for sample, ctx, row in zip(samples, contexts, tokens.tolist()):
        new = row[len(ctx):len(ctx) + 6]
        new = new[:new.index(0)] if 0 in new else new  # the byte tokenizer's end of text
        text = bytes(new).decode("utf-8", errors="replace").split("\n")[0]
        assert sample["resps"][0][0] == text


@pytest.mark.parametrize("args, named", [
    ({"likelihood": "greedy"}, "likelihood='greedy'"),
    ({"mc": 0}, "mc=0"),
    ({"mc": "many"}, "mc='many'"),
    ({"loss_type": "nll"}, "unknown loss type 'nll'"),
    ({"loss_type": "ar_forward", "mc": 4}, "loss_type='ar_forward', mc=4"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"backend": "triton"}, "backend='triton'"),
    ({"steps": -1}, "steps=-1"),
    ({"temperature": 0.5}, "unknown radd model argument(s) ['temperature']"),
    ({"pretrained": ""}, "needs pretrained="),
    ({"pretrained": "/no/such/folder"}, "no such checkpoint folder"),
    ({"tokenizer": "bytes", "pretrained": "TOKENS_11"}, "tokenizer='bytes'"),
])
def test_a_bad_model_argument_is_one_line_naming_it(folders, tmp_path, args, named):
    if args.get("pretrained") == "TOKENS_11":  # a model with fewer tokens than the byte tokenizer's 256 ids
        from tests.support.models import loss_model

        loss_model().save_pretrained(tmp_path / "small")
        args = {**args, "pretrained": str(tmp_path / "small")}
    with pytest.raises(UserError) as info:
        RADDLM(**{"pretrained": str(folders.model), **args})
    assert named in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("gen_kwargs, named", [
    ({"until": ["\n"], "penalty_alpha": 0.6}, "['penalty_alpha']"),
    ({"temperature": 0.7}, "temperature=0.7"),
    ({"max_gen_toks": 32}, "max_gen_toks=32"),
    ({"max_gen_toks": "lots"}, "max_gen_toks='lots'"),
    ({"temperature": "warm"}, "temperature='warm'"),
    ({"do_sample": True, "top_p": 1.5}, "top_p=1.5"),
])
def test_a_bad_generation_option_is_one_line_naming_it(folders, gen_kwargs, named):
    lm = RADDLM(pretrained=str(folders.model), steps=2)
    with pytest.raises(AdapterError, match=re.escape(named)):
        lm.generate_until([SimpleNamespace(args=("hello", gen_kwargs))])


def test_the_command_line_entry_runs_the_harness_with_radd(folders):
    out_dir = folders.root / "cli"
    cmd = [sys.executable, "-m", "radd_fast.integrations.lm_eval", "--model", "radd", "--tasks", "tiny_lambada",
           "--include_path", str(folders.tasks), "--device", "cpu", "--output_path", str(out_dir),
           "--model_args", f"pretrained={folders.model},seed={SEED}"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    [written] = list(out_dir.rglob("results_*.json"))
    saved = json.loads(written.read_text())
    assert saved["config"]["radd"]["pretrained"] == str(folders.model) and "tiny_lambada" in saved["results"]
    bad = subprocess.run(cmd[:-1] + [f"pretrained={folders.model},likelihood=bogus"], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
        "error: likelihood='bogus': expected one of exact, elbo")
    assert "Traceback" not in bad.stderr
