"""Generative perplexity of samples and their unigram entropy (docs/EVALUATION.md).

A causal LM (GPT-2 large by default; any hub name or local folder that
``transformers.AutoModelForCausalLM`` loads) scores each sample:
``ppl = exp(mean token cross-entropy)`` over the tokens it predicts (every
token but the first; no BOS is prepended, as in the published evaluation),
and the per-sample values are averaged.

Samples come as JSONL (what sample.py writes): one object per line with
``text`` and/or ``ids``. Token ids are used as they are when the sample
tokenizer and the scorer's tokenizer have the same vocabulary (e.g. gpt2 /
gpt2-large); otherwise the ids are decoded with the sample tokenizer and the
text re-encoded with the scorer's ("retokenized"). Samples longer than the
scorer's context are scored in windows that overlap by one token, so every
token after the first is predicted exactly once.

Unigram entropy (nats) of a sample = entropy of the histogram of its own token
ids (the sampler's ids when the line has them, else the scorer's tokens). Low
entropy with a low PPL is the signature of a collapsed, repetitive sampler:
a constant sample has entropy 0.
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..data.sources import DataError, jsonl_records
from ..hub import hub_unreachable_hint
from ..progress import progress_bar
from .ppl import perplexity
from .protocol import EvalError

SCORER_INSTEAD = "pass --scorer <local folder of a causal LM>"


def read_samples(path) -> list[dict]:
    """JSONL -> list of dicts, each with ``text`` and/or ``ids``; a ``DataError`` names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such samples file: {path}")
    samples = []
    for n, item in jsonl_records(path):  # not UTF-8, not JSON: named with the line by the reader
        if not isinstance(item, dict) or not ("text" in item or "ids" in item):
            raise DataError(f"{path}:{n}: each line must be an object with 'text' and/or 'ids', such as sample.py "
                            f"--out writes")
        samples.append(item)
    if not samples:
        raise DataError(f"{path} holds no samples")
    return samples


def unigram_entropy(ids: Sequence[int]) -> float:
    """Entropy (nats) of the token histogram of one sample; 0 for a constant (or empty) sample."""
    n = len(ids)
    if n == 0:
        return 0.0
    return -sum((c / n) * math.log(c / n) for c in Counter(int(i) for i in ids).values())


def same_vocabulary(a, b) -> bool:
    """True when two tokenizers map the same strings to the same ids (ids can be reused as they are)."""
    a, b = getattr(a, "tok", a), getattr(b, "tok", b)  # radd_fast.data.HFTokenizer wraps a transformers one
    if a is b:
        return True
    get_a, get_b = getattr(a, "get_vocab", None), getattr(b, "get_vocab", None)
    return callable(get_a) and callable(get_b) and get_a() == get_b()


def scorer_problem(name: str, instead: str = SCORER_INSTEAD) -> str | None:
    """Why the scorer ``name`` cannot be loaded now (not a folder; a hub name neither cached nor
    reachable), or None when it may be: said in seconds, before the hub client spends its retries."""
    path = Path(name).expanduser()
    if path.is_dir():
        return None
    if path.exists() or str(name).startswith((".", "/", "~")) or str(name).count("/") > 1:
        return f"scorer {name!r} is not a folder; {instead}"
    # huggingface_hub only for this cache lookup (transformers imports it anyway when scoring)
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(str(name), "config.json"), str):
        return None
    return hub_unreachable_hint(f"scorer {name!r}", instead)


def load_scorer(name_or_path: str, device, dtype=torch.float32):
    """(causal LM in eval mode, its tokenizer) from a hub name or a local folder; EvalError naming the
    scorer when it cannot be loaded (no such folder, or a hub name with no network), before any
    retries."""
    problem = scorer_problem(str(name_or_path))
    if problem is not None:
        raise EvalError(problem)
    # transformers is heavy and only needed for gen-PPL: imported here, not at module import
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise EvalError(f"could not load the scorer {name_or_path!r} (--scorer / --eval_model): pass a local folder "
                        f"of a causal LM, or fetch it first with network access ({' '.join(str(e).split())[:200]})"
                        ) from e
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def scorer_tokens(samples: list[dict], scorer_tokenizer, sample_tokenizer=None) -> tuple[list[list[int]], bool]:
    """The scorer's token ids per sample, and whether any sample had to be retokenized."""
    reuse_ids = sample_tokenizer is not None and same_vocabulary(sample_tokenizer, scorer_tokenizer)
    out, retokenized = [], False
    for n, s in enumerate(samples):
        if "ids" in s and reuse_ids:
            out.append([int(i) for i in s["ids"]])
            continue
        if "ids" in s and sample_tokenizer is not None:
            text = sample_tokenizer.decode([int(i) for i in s["ids"]])
        elif "text" in s:
            text = s["text"]
        else:
            raise ValueError(f"sample {n} has only 'ids': pass the tokenizer that produced them (--tokenizer)")
        out.append(list(scorer_tokenizer(text, add_special_tokens=False)["input_ids"]))
        retokenized = True
    return out, retokenized


def _windows(ids: list[int], ctx: int) -> list[list[int]]:
    """Windows of at most ctx tokens overlapping by one: each token after the first is a target once."""
    if len(ids) < 2:
        return []
    step = max(ctx - 1, 1)
    return [ids[s:s + ctx] for s in range(0, len(ids) - 1, step)]


@torch.no_grad()
def token_nll(model, seqs: list[list[int]], batch_size: int = 8, progress: bool = False) -> list[tuple[float, int]]:
    """(sum of next-token cross-entropies, number of predicted tokens) per sequence."""
    cfg = model.config
    ctx = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or 1024
    device = next(model.parameters()).device
    rows = [(i, w) for i, s in enumerate(seqs) for w in _windows(s, ctx)]
    rows.sort(key=lambda r: len(r[1]))  # similar lengths per batch: little padding
    totals = [[0.0, 0] for _ in seqs]
    starts = range(0, len(rows), batch_size)
    bar = progress_bar(progress, len(starts), "gen ppl", unit="batch")
    for b in starts:
        chunk = rows[b:b + batch_size]
        n = max(len(w) for _, w in chunk)
        ids = torch.zeros(len(chunk), n, dtype=torch.long)
        mask = torch.zeros(len(chunk), n, dtype=torch.long)
        for r, (_, w) in enumerate(chunk):
            ids[r, :len(w)] = torch.tensor(w)
            mask[r, :len(w)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # [b, n-1, V]
        ce = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none") * mask[:, 1:]  # [b, n-1]
        sums, counts = ce.sum(1).tolist(), mask[:, 1:].sum(1).tolist()  # one host sync per batch
        for r, (i, _) in enumerate(chunk):
            totals[i][0] += sums[r]
            totals[i][1] += int(counts[r])
        bar.update(1)
    bar.close()
    return [(t[0], t[1]) for t in totals]


def score_samples(samples: list[dict], eval_model="gpt2-large", sample_tokenizer=None, *, device=None,
                  batch_size: int = 8, dtype=torch.float32, progress: bool = True) -> dict:
    """Generative PPL and unigram entropy of samples.

    Args:
        samples: dicts with ``text`` and/or ``ids`` (see ``read_samples``).
        eval_model: hub name / local folder of a causal LM, or a ``(model, tokenizer)`` pair.
        sample_tokenizer: the tokenizer that produced ``ids`` (needed to decode them when the
            vocabularies differ); None scores ``text``.
    Returns:
        ``{"mean_ppl", "median_ppl", "mean_entropy", "num_samples", "retokenized", "per_sample": [...]}``;
        samples with fewer than two scorer tokens get ``ppl: None`` and are left out of the means.

    Example::

        res = score_samples([{"text": "The cat sat on the mat."}], "gpt2-large", device="cuda")
        print(res["mean_ppl"], res["mean_entropy"])
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(eval_model, (tuple, list)):
        model, tokenizer = eval_model
        name = getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__)
    else:
        model, tokenizer = load_scorer(eval_model, device, dtype)
        name = str(eval_model)
    seqs, retokenized = scorer_tokens(samples, tokenizer, sample_tokenizer)
    nll = token_nll(model, seqs, batch_size=batch_size, progress=progress)
    per_sample = []
    for s, toks, (total, count) in zip(samples, seqs, nll):
        own = s["ids"] if "ids" in s else toks
        per_sample.append({"ppl": perplexity(total, count) if count else None, "nll": total / count if count else None,
                           "scored_tokens": count, "entropy": unigram_entropy(own), "num_tokens": len(own)})
    ppls = sorted(p["ppl"] for p in per_sample if p["ppl"] is not None)
    if not ppls:
        raise ValueError("no sample has two or more scorer tokens: nothing to score")
    mean = sum(ppls) / len(ppls)
    std = math.sqrt(sum((p - mean) ** 2 for p in ppls) / (len(ppls) - 1)) if len(ppls) > 1 else 0.0
    if math.isinf(mean):  # a sample past exp's range: its PPL is inf, and so are the mean and its spread
        std = math.inf
    return {
        "eval_model": name,
        "num_samples": len(samples),
        "num_scored": len(ppls),
        "mean_ppl": mean,
        "median_ppl": ppls[len(ppls) // 2] if len(ppls) % 2 else 0.5 * (ppls[len(ppls) // 2 - 1] + ppls[len(ppls) // 2]),
        "std_ppl": std,  # spread of the per-sample values
        "stderr_ppl": std / math.sqrt(len(ppls)),  # of the mean
        "mean_entropy": sum(p["entropy"] for p in per_sample) / len(per_sample),
        "retokenized": retokenized,
        "entropy_unit": "nats",
        "per_sample": per_sample,
    }
