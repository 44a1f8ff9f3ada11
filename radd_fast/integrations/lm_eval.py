"""The lm-evaluation-harness door: RADD as the harness's model ``radd`` (docs/INTEGRATIONS.md).

    python -m radd_fast.integrations.lm_eval --model radd --tasks lambada_openai --batch_size auto \\
        --model_args pretrained=JingyangOu/radd-t-dce,likelihood=exact

takes exactly the harness's ``lm_eval`` arguments: the harness's own command knows only its own
table of models and finds none that another package registers, so this entry imports the adapter
(which registers ``radd``) and then runs the harness's command line. In Python, importing this
module registers ``radd`` for ``lm_eval.simple_evaluate(model="radd", model_args=...)``.

What each request type computes (``get_model_info`` puts the same in the results' ``config``):

- ``loglikelihood``: ``likelihood=exact`` (default): log p(continuation | context) exactly, for
  the continuation revealed left to right (``likelihood.left_to_right_log_likelihood``);
  ``likelihood=elbo``: the any-order Monte Carlo ELBO over ``mc`` draws
  (``likelihood.monte_carlo_log_likelihood``). ``is_greedy`` is the left-to-right argmax check
  in both.
- ``loglikelihood_rolling``: the text's tokens cut into windows of the model length L, each
  scored by ``evaluate_ppl`` (the ELBO of ``loss_type`` over ``mc`` draws, eval.py's numbers; a
  last partial window at its own length), summed and negated. No end-of-text token is added.
- ``generate_until``: the sampling engine (``radd_fast.generate``) on rows of length L with the
  context as a fixed prefix, the first ``max_gen_toks`` tokens after it decoded and cut at the
  first end-of-text token and the first ``until`` string.

Model arguments (``--model_args k=v,...``): pretrained (a hub id, hub folder or run folder),
tokenizer (default: the checkpoint's), likelihood (exact | elbo), mc (draws; default 1024, 1 for an
exact ar_* loss_type), loss_type (default lambda_DCE), steps (sampling steps; default the
engine's), seed, backend, dtype; the harness's device and batch_size (rows of length L per body
pass, windows per batch, rows in flight; ``auto``: from the device). Any other is an error.
"""
from __future__ import annotations

import sys

# lm_eval.models: the harness's own models stay registered beside ours (its get_model imports them
# only while its registry is empty).
import lm_eval.models  # noqa: F401
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..checkpoint import load_model
from ..config import BACKENDS
from ..data.tokenizers import default_tokenizer_name, get_tokenizer, tokenizer_mismatch
from ..errors import UserError, run_cli
from ..evaluation.ppl import EXACT_LOSS_TYPES, check_loss_type, evaluate_ppl
from ..evaluation.protocol import DEFAULT_LOSS_TYPE, PAPER_MC_TIMESTEPS, default_mc_timesteps
from ..sampling import SamplerConfig, generate
from .likelihood import (
    default_rows_per_forward,
    left_to_right_log_likelihood,
    monte_carlo_log_likelihood,
    request_seed,
)

MODEL_NAME = "radd"
LIKELIHOODS = ("exact", "elbo")
DEFAULT_MAX_GEN_TOKS = 256
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k")


class AdapterError(UserError):
    """A bad model argument or generation option of the harness adapter (one line, naming it)."""


@register_model(MODEL_NAME)
class RADDLM(LM):
    """RADD behind the harness's ``LM`` API; see the module docstring for what each request computes."""

    def __init__(self, pretrained: str | None = None, tokenizer: str | None = None, likelihood: str = "exact",
                 mc: int | None = None, loss_type: str | None = None, steps: int | None = None, seed: int = 0,
                 backend: str = "auto", dtype: str | None = None, device: str | None = None,
                 batch_size: int | str | None = None, max_batch_size: int | None = None, **unknown):
        super().__init__()
        if unknown:
            raise AdapterError(f"unknown radd model argument(s) {sorted(unknown)}; expected some of pretrained, "
                               f"tokenizer, likelihood, mc, loss_type, steps, seed, backend, dtype, device, batch_size")
        if not pretrained:
            raise AdapterError("the radd model needs pretrained=<hub id, hub folder or run folder> in --model_args")
        if likelihood not in LIKELIHOODS:
            raise AdapterError(f"likelihood={likelihood!r}: expected one of {', '.join(LIKELIHOODS)}")
        if backend not in BACKENDS:
            raise AdapterError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
        self.loss_type = loss_type or DEFAULT_LOSS_TYPE
        self.mc = _whole(mc, "mc") if mc is not None else None
        try:
            check_loss_type(self.loss_type, self.rolling_mc)
        except ValueError as e:
            raise AdapterError(f"loss_type={self.loss_type!r}, mc={self.rolling_mc}: {e}") from None
        self.likelihood = likelihood
        self.steps = _whole(steps, "steps") if steps is not None else None
        self.seed = _whole(seed, "seed", minimum=0)
        self.batch_size = _batch_size(batch_size)  # None: auto
        self.max_batch_size = _whole(max_batch_size, "max_batch_size") if max_batch_size is not None else None
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.noise = load_model(pretrained, device=device, backend=backend, dtype=dtype)
        self._device = self.model.device
        self.pretrained = str(pretrained)
        self._tokenizer_name = tokenizer or default_tokenizer_name(self.model.config)
        self.tok = get_tokenizer(self._tokenizer_name)
        problem = tokenizer_mismatch(self.tok.vocab_size, self.model.config.tokens, self._tokenizer_name, exact=False)
        if problem:
            raise AdapterError(f"tokenizer={self._tokenizer_name!r}: {problem}")

    # -- what the harness asks ------------------------------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args) for req in requests]
        rows = self._rows_per_batch()
        exact = left_to_right_log_likelihood(self.model, pairs, rows)
        if self.likelihood == "exact":
            return exact
        elbo = monte_carlo_log_likelihood(self.model, pairs, self.loglikelihood_mc, self.seed, rows)
        return [(value, greedy) for value, (_, greedy) in zip(elbo, exact)]

    def loglikelihood_rolling(self, requests) -> list[float]:
        return [self._rolling(self.tok.encode(req.args[0])) for req in requests]

    def generate_until(self, requests) -> list[str]:
        jobs = [(self.tok.encode(context), _generation_options(gen_kwargs)) for context, gen_kwargs in
                (req.args for req in requests)]
        out: list[str | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, (_, (_, max_toks, strategy)) in enumerate(jobs):
            groups.setdefault((max_toks, strategy), []).append(i)
        for (max_toks, strategy), members in groups.items():
            texts = self._generate([jobs[i][0] for i in members], max_toks, strategy)
            for i, text in zip(members, texts):
                out[i] = _cut(text, jobs[i][1][0])
        return out

    def get_model_info(self) -> dict:
        """What each request type computed, recorded in the harness's results (``config``)."""
        L = self.model.length
        bound = "exact NLL" if self.loss_type in EXACT_LOSS_TYPES else "ELBO"
        loglik = ("exact log-likelihood of the continuation revealed left to right (any-order, context visible)"
                  if self.likelihood == "exact" else
                  f"Monte Carlo any-order ELBO of the continuation given the context, {self.loglikelihood_mc} draws")
        return {"radd": {"pretrained": self.pretrained, "tokenizer": self._tokenizer_name, "length": L,
                         "loglikelihood": loglik,
                         "loglikelihood_rolling": f"{bound} of {self.loss_type} over {self.rolling_mc} draws, "
                                                  f"windows of {L} tokens (evaluate_ppl)",
                         "generate_until": f"radd_fast.generate, {self._sampling_steps} steps, context as prefix",
                         "seed": self.seed, "backend": self.model.backend}}

    @property
    def tokenizer_name(self) -> str:
        return self._tokenizer_name

    # -- the pieces -----------------------------------------------------------------------------
    @property
    def rolling_mc(self) -> int:
        return self.mc or default_mc_timesteps(self.loss_type)

    @property
    def loglikelihood_mc(self) -> int:
        return self.mc or PAPER_MC_TIMESTEPS

    @property
    def _sampling_steps(self) -> int:
        return self.steps or SamplerConfig().steps

    def _rows_per_batch(self) -> int:
        """Rows (or windows) of length L per body pass: batch_size, else from the device (at most max_batch_size)."""
        if self.batch_size is not None:
            return self.batch_size
        return min(default_rows_per_forward(self.model), self.max_batch_size or sys.maxsize)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation); the context's trailing spaces go to the continuation,
        and the split is made in the tokens of the whole text, as the harness does for its models."""
        stripped = context.rstrip()
        continuation = context[len(stripped):] + continuation
        whole = self.tok.encode(stripped + continuation)
        ctx = self.tok.encode(stripped) if stripped else []
        return ctx, whole[len(ctx):]

    def _rolling(self, ids: list[int]) -> float:
        """-(ELBO of the text's windows of L tokens), each window scored by ``evaluate_ppl``."""
        L, per_batch = self.model.length, self._rows_per_batch()
        windows = [ids[i:i + L] for i in range(0, len(ids), L)]
        full = [w for w in windows if len(w) == L]
        runs = [[torch.tensor(full[i:i + per_batch]) for i in range(0, len(full), per_batch)]]
        runs += [[torch.tensor(windows[-1:])]] if windows and len(windows[-1]) < L else []  # its own length
        total = 0.0
        with torch.random.fork_rng(devices=[self._device] if self._device.type == "cuda" else []):
            torch.manual_seed(request_seed(self.seed, ids))
            for batches in filter(None, runs):  # evaluate_ppl takes one window length per run
                result = evaluate_ppl(self.model, self.noise, batches, self.loss_type, self.rolling_mc,
                                      progress=False)
                total += sum(mean * len(batch) for mean, batch in zip(result.batch_losses, batches))
        return -total

    def _generate(self, contexts: list[list[int]], max_toks: int, strategy: tuple) -> list[str]:
        """Sample rows of length L with each context as a fixed prefix; the first ``max_toks`` tokens
        after it, decoded and cut at the first end-of-text token."""
        L, mask = self.model.length, self.model.mask_id
        if max_toks >= L:
            raise AdapterError(f"max_gen_toks={max_toks} leaves no room for a context in the model's length {L}")
        cond = torch.full((len(contexts), L), mask, dtype=torch.int64)
        kept = [ctx[max(0, len(ctx) - (L - max_toks)):] for ctx in contexts]
        for r, ctx in enumerate(kept):
            cond[r, :len(ctx)] = torch.tensor(ctx, dtype=torch.int64)
        name, para = strategy
        tokens, _ = generate(self.model, self.noise, len(contexts), L, self._sampling_steps, conditioning=cond,
                             seed=request_seed(self.seed, "generate", contexts), progress=False,
                             strategy=name, strategy_para=para, rows_in_flight=self.batch_size or self.max_batch_size)
        texts = []
        for row, ctx in zip(tokens.tolist(), kept):
            new = row[len(ctx):len(ctx) + max_toks]
            if self.tok.eos_token_id in new:
                new = new[:new.index(self.tok.eos_token_id)]
            texts.append(self.tok.decode(new))
        return texts


def _generation_options(gen_kwargs) -> tuple[list[str], int, tuple]:
    """(until strings, max_gen_toks, (strategy, parameter)) of one request's ``gen_kwargs``."""
    kwargs = dict(gen_kwargs or {})
    unknown = sorted(set(kwargs) - set(GEN_KWARGS))
    if unknown:
        raise AdapterError(f"generation option(s) {unknown} are not supported by the radd model; "
                           f"expected some of {', '.join(GEN_KWARGS)}")
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_toks = _whole(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS), "max_gen_toks")
    temperature = _number(kwargs.get("temperature"), "temperature")
    if temperature not in (None, 0.0, 1.0):
        raise AdapterError(f"temperature={temperature}: the radd model samples at temperature 1 or, with 0 "
                           f"(or do_sample=False), takes the most likely token at each revealed position")
    if kwargs.get("do_sample") is False or temperature == 0.0:
        return until, max_toks, ("top_k", 1)
    if kwargs.get("top_k") is not None:
        return until, max_toks, ("top_k", _whole(kwargs["top_k"], "top_k"))
    top_p = _number(kwargs.get("top_p"), "top_p")
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise AdapterError(f"top_p={top_p}: expected a probability in (0, 1]")
        return until, max_toks, ("top_p", top_p)
    return until, max_toks, ("direct", None)


def _cut(text: str, until: list[str]) -> str:
    """``text`` up to the first occurrence of any ``until`` string."""
    end = min((text.index(s) for s in until if s and s in text), default=len(text))
    return text[:end]


def _number(value, name: str) -> float | None:
    """None, or ``value`` as a float, else an AdapterError naming ``name``."""
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise AdapterError(f"{name}={value!r}: expected a number") from None


def _whole(value, name: str, minimum: int = 1) -> int:
    """A whole number >= minimum given as an int or its text, else an AdapterError naming ``name``."""
    try:
        number = int(str(value))
    except ValueError:
        number = None
    if number is None or isinstance(value, bool) or number < minimum:
        raise AdapterError(f"{name}={value!r}: expected a whole number >= {minimum}")
    return number


def _batch_size(batch_size) -> int | None:
    """The harness's batch size: None for ``auto`` (then from the device), else a whole number >= 1."""
    if batch_size is None or str(batch_size).startswith("auto"):
        return None
    return _whole(batch_size, "batch_size")


def main(argv: list[str]) -> int:
    """The harness's command line with ``radd`` registered: ``python -m radd_fast.integrations.lm_eval ...``."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
