"""Snapshot sampling during training: samples under the EMA weights, and their generative PPL.

Uses ``radd_fast.sampling.generate`` when that module is installed in this
checkout, and ``radd_fast.evaluation.gen_ppl.score_samples`` for the PPL; when
either is missing the step is skipped with one log line (training goes on: the
samples are a diagnostic, not part of the training state). Errors raised inside
them are not caught.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch

from .distributed import all_reduce_mean

log = logging.getLogger(__name__)
SEPARATOR = "=" * 92
_warned: set = set()


def _optional(module: str, name: str):
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not module.startswith(e.name):  # a missing dependency inside it is a real error
            raise
        mod = None
    fn = getattr(mod, name, None)
    if fn is None and module not in _warned:
        _warned.add(module)
        log.warning("%s.%s is not available: skipping it during training", module, name)
    return fn


@torch.no_grad()
def snapshot_samples(model, ema, noise, tokenizer, cfg, step: int, run_dir: Path, env, metrics) -> list[str] | None:
    """Write samples/iter_<step>/sample_<rank>.txt (published layout); returns this rank's texts."""
    generate = _optional("radd_fast.sampling", "generate")
    if generate is None:
        return None
    folder = Path(run_dir) / "samples" / f"iter_{step}"
    folder.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    with ema.average_parameters(list(model.parameters())):
        tokens, _ = generate(model, noise, num_samples=cfg.sampling.num_samples, length=model.length,
                             steps=cfg.sampling.steps, method=cfg.sampling.predictor, strategy=cfg.sampling.strategy,
                             progress=False)
    model.train(was_training)
    texts = tokenizer.batch_decode(tokens.tolist())
    with (folder / f"sample_{env.rank}.txt").open("w", encoding="utf-8") as fh:
        for text in texts:
            fh.write(text + "\n" + SEPARATOR + "\n")
    if cfg.eval.perplexity:
        score = _optional("radd_fast.evaluation.gen_ppl", "score_samples")
        if score is not None:
            res = score([{"text": t} for t in texts], cfg.eval.perplexity_model, device=env.device,
                        batch_size=cfg.eval.perplexity_batch_size, progress=False)
            ppl = all_reduce_mean(torch.tensor(float(res["mean_ppl"]), device=env.device), env).item()
            log.info("step %d: generative perplexity %.3f (%s)", step, ppl, cfg.eval.perplexity_model)
            metrics.log(step, gen_ppl=ppl)
    return texts
