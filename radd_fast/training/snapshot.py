"""Snapshot sampling during training: samples under the EMA weights, and their generative PPL.

Samples come from ``radd_fast.sampling.generate``, their perplexity under
``eval.perplexity_model`` from ``radd_fast.evaluation.gen_ppl.score_samples``. A
scorer that cannot be had (not cached and no network, no such folder) is a
warning that skips the perplexity for the rest of the run, never a crash: the
samples are a diagnostic, not part of the training state.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..distributed import all_reduce_mean
from ..errors import UserError
from ..evaluation.gen_ppl import score_samples, scorer_problem
from ..files import atomic_write_text
from ..sampling import generate
from .metrics import RESUME

log = logging.getLogger(__name__)
SEPARATOR = "=" * 92
# Scorers found unusable in this process: warned about once, then skipped.
_unusable_scorers: set = set()
SCORER_INSTEAD = "pass eval.perplexity_model=<local folder of a causal LM> or eval.perplexity=false"


@torch.no_grad()
def snapshot_samples(model, ema, noise, tokenizer, cfg, step: int, run_dir: Path, env, metrics) -> list[str] | None:
    """Write samples/iter_<step>/sample_<rank>.txt (published layout); returns this rank's texts."""
    folder = Path(run_dir) / "samples" / f"iter_{step}"
    folder.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    with ema.average_parameters(list(model.parameters())):
        tokens, _ = generate(model, noise, num_samples=cfg.sampling.num_samples, length=model.length,
                             config=cfg.sampling.sampler(), progress=False)
    model.train(was_training)
    texts = tokenizer.batch_decode(tokens.tolist())
    atomic_write_text(folder / f"sample_{env.rank}.txt", "".join(f"{text}\n{SEPARATOR}\n" for text in texts),
                      advice=RESUME)
    if cfg.eval.perplexity:
        _log_generative_perplexity(texts, cfg, step, env, metrics)
    return texts


def _log_generative_perplexity(texts: list[str], cfg, step: int, env, metrics) -> None:
    """Score the snapshot's samples; an unusable scorer is warned about once and skipped."""
    name = cfg.eval.perplexity_model
    if name in _unusable_scorers:
        return
    problem = scorer_problem(name, instead=SCORER_INSTEAD)
    res = None
    if problem is None:
        try:
            res = score_samples([{"text": t} for t in texts], name, device=env.device,
                                batch_size=cfg.eval.perplexity_batch_size, progress=False)
        except UserError as e:  # the scorer could not be loaded: a diagnostic is lost, not the run
            problem = str(e)
    if problem is not None:
        _unusable_scorers.add(name)
        log.warning("step %d: skipping the generative perplexity for the rest of the run: %s", step, problem)
        return
    ppl = all_reduce_mean(torch.tensor(float(res["mean_ppl"]), device=env.device), env).item()
    log.info("step %d: generative perplexity %.3f (%s)", step, ppl, name)
    metrics.log(step, gen_ppl=ppl)
