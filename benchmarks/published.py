"""The published RADD code as benchmark providers, imported from a checkout at run time.

Nothing of it is copied into this repository. ``load_published(path)`` puts ``path`` on
``sys.path`` only while it imports; the modules that came from there (``model``, ``losses``,
``sampling``, ``noise_lib``, ``catsample``, ``utils``, ``load_model``) are then moved under the
private prefix ``_published_radd.`` in ``sys.modules``, and ``sys.path`` and any modules of the
same names loaded before are put back, so our own imports never see theirs. Its dependencies are
plain packages (einops, omegaconf, huggingface_hub: ``pip install -e ".[bench]"``); it needs no
GPU-only kernel library (its attention is PyTorch's SDPA), so no stand-in module is injected and
the rows say plain ``published``.

What each provider runs (docs/BENCHMARKS.md):
- forward: ``model(x)`` of the published class under its own autocast (``model.dtype`` of the
  config, float16 as in the released configs; on CPU the CUDA autocast is a no-op: fp32);
- train: its ``get_loss_fn`` (lambda_DCE), ``get_optimizer`` (AdamW with the optim section of its
  configs/config.yaml), a GradScaler and ``optimization_manager``'s update (unscale, warm-up
  learning rate, grad clip). Its EMA update is left out, as it is from every provider;
- sampling: its ``DiffusionSampler`` (direct strategy, per-row cache, ``update_cnt`` / samples as
  E-NFE), and the same direct step with the cache removed (every row evaluated at every step);
- eval: what evaluation_modeling.py computes per batch: the mean over Monte Carlo draws of its
  ``loss_fn(model, batch).mean()``, without gradients.

The weights are ours: ``twin(ours, pub, device)`` writes our model with ``save_pretrained`` and
reads it back with the published loader, then checks every tensor is bit-identical.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import io
import itertools
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from radd_fast.errors import UserError

ENV_VAR = "RADD_PUBLISHED"
PREFIX = "_published_radd"
# The modules we import, in dependency order, and the files a usable checkout must hold.
MODULES = ("noise_lib", "catsample", "losses", "sampling", "model", "model.ema", "utils", "load_model")
REQUIRED_FILES = ("model/__init__.py", "model/transformer.py", "model/rotary.py", "model/ema.py", "noise_lib.py",
                  "catsample.py", "losses.py", "sampling.py", "utils.py", "load_model.py", "configs/config.yaml")
# Third-party packages the published modules import at the top.
DEPENDENCIES = ("einops", "omegaconf", "huggingface_hub")
LABEL = "published"


class PublishedCodeError(UserError):
    """The published checkout is missing, incomplete, or its dependencies are not installed."""


@dataclass
class Published:
    """The imported published modules of one checkout. ``digest``: sha256 over its Python and YAML
    files (what ran, recorded in every result file)."""

    path: Path
    modules: dict
    digest: str

    def __getattr__(self, name: str) -> ModuleType:
        modules = self.__dict__.get("modules", {})
        if name in modules:
            return modules[name]
        raise AttributeError(name)

    def describe(self) -> dict:
        return {"path": str(self.path), "sha256": self.digest, "label": LABEL}


_LOADED: dict[Path, Published] = {}


def check_checkout(path) -> Path:
    """The resolved checkout folder; raises PublishedCodeError naming the path or missing file."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise PublishedCodeError(f"--published {path}: no such folder (point it at a checkout of the published "
                                 f"RADD code, github.com/ML-GSAI/RADD)")
    missing = [f for f in REQUIRED_FILES if not (root / f).is_file()]
    if missing:
        raise PublishedCodeError(f"--published {path} is not a checkout of the published RADD code: "
                                 f"missing {', '.join(missing)}")
    return root.resolve()


def check_dependencies() -> None:
    missing = [name for name in DEPENDENCIES if importlib.util.find_spec(name) is None]
    if missing:
        raise PublishedCodeError(f"the published RADD code imports {', '.join(missing)}, which "
                                 f"{'is' if len(missing) == 1 else 'are'} not installed: "
                                 f"pip install -e \".[bench]\" (or pip install {' '.join(missing)})")


def tree_digest(root: Path) -> str:
    """sha256 over the relative paths and bytes of the checkout's .py and .yaml files."""
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".yaml") and ".git" not in p.parts):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _under(module: ModuleType, root: Path) -> bool:
    file = getattr(module, "__file__", None)
    return bool(file) and Path(file).resolve().is_relative_to(root)


@contextlib.contextmanager
def _isolated_imports(root: Path):
    """``root`` first on sys.path and the published module names free while the block imports;
    afterwards every module from ``root`` lives under PREFIX and sys.path / earlier modules are back."""
    tops = {name.split(".")[0] for name in MODULES}
    saved_path = list(sys.path)
    stashed = {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] in tops}
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        for name in [n for n, m in list(sys.modules.items()) if n.split(".")[0] in tops or _under(m, root)]:
            module = sys.modules.pop(name)
            if _under(module, root):
                sys.modules[f"{PREFIX}.{name}"] = module
        sys.modules.update(stashed)
        sys.path[:] = saved_path


def load_published(path) -> Published:
    """Import the published modules from the checkout at ``path`` (cached per folder)."""
    root = check_checkout(path)
    if root in _LOADED:
        return _LOADED[root]
    check_dependencies()
    modules = {}
    with _isolated_imports(root), quiet():
        for name in MODULES:
            try:
                modules[name] = importlib.import_module(name)
            except Exception as e:  # their code, their dependencies: say which module, from where
                raise PublishedCodeError(f"importing {name} of the published code at {root} failed: "
                                         f"{type(e).__name__}: {e}") from e
    pub = Published(path=root, modules=modules, digest=tree_digest(root))
    _LOADED[root] = pub
    return pub


@contextlib.contextmanager
def quiet():
    """Silence what the published code prints with current torch and Python: the deprecation of
    ``torch.cuda.amp.autocast``, its "CUDA is not available" notice on CPU, the hub mixin's
    "Loading weights" line, and an escape-sequence warning when its files are compiled."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"(?s).*CUDA is not available.*")
        warnings.filterwarnings("ignore", message="invalid escape sequence")  # a docstring of noise_lib.py
        yield


# -- the same weights ------------------------------------------------------------------------------
def twin(ours: torch.nn.Module, pub: Published, device: torch.device):
    """(published model, published noise) holding exactly ``ours``'s weights: written by our
    ``save_pretrained``, read by the published ``load_model``; raises if any tensor differs."""
    with tempfile.TemporaryDirectory() as folder:
        ours.save_pretrained(folder)
        try:
            with quiet():
                model, noise = pub.load_model.load_model(folder, device)
        except Exception as e:  # their loader falls back to a run folder and fails there: say what it read
            raise RuntimeError(f"the published load_model could not read the hub folder our save_pretrained "
                               f"wrote ({type(e).__name__}: {e})") from e
    check_same_weights(ours, model)
    return model.eval(), noise


def check_same_weights(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    a, b = ours.state_dict(), theirs.state_dict()
    if set(a) != set(b):
        raise RuntimeError(f"parameter names differ: ours only {sorted(set(a) - set(b))}, "
                           f"published only {sorted(set(b) - set(a))}")
    differ = [k for k in a if not torch.equal(a[k].detach().float().cpu(), b[k].detach().float().cpu())]
    if differ:
        raise RuntimeError(f"weights differ after the published load_model: {differ[:5]}")


def token_dim(model) -> int:
    """V = tokens + 1, as the published scripts compute it (the last id is MASK)."""
    return int(model.config.tokens) + 1


# -- providers -------------------------------------------------------------------------------------
def forward_fn(model, x: torch.Tensor):
    """``model(x)`` without gradients: [B, T] -> [B, T, V] (fp16 under its CUDA autocast)."""

    @torch.no_grad()
    def forward():
        with quiet():
            return model(x)

    return forward


def train_step_fn(pub: Published, model, noise, x: torch.Tensor, loss_type: str = "lambda_DCE"):
    """One optimizer step of the published training loop on the fixed batch ``x [B, T]``, EMA aside."""
    from omegaconf import OmegaConf  # lazy: a dependency of the published code only

    cfg = OmegaConf.load(pub.path / "configs" / "config.yaml")
    device = x.device
    loss_fn = pub.losses.get_loss_fn(noise, token_dim(model), True, loss_type=loss_type)
    optimizer = pub.losses.get_optimizer(cfg, itertools.chain(model.parameters(), noise.parameters()))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")  # published: torch.cuda.amp.GradScaler()
    optimize = pub.losses.optimization_manager(cfg)
    state = {"step": 0}

    def step():
        with quiet():
            loss = loss_fn(model, x).mean()
            scaler.scale(loss).backward()
            state["step"] += 1
            optimize(optimizer, scaler, model.parameters(), step=state["step"])
            optimizer.zero_grad()

    return step


class HalfOutputOnCPU(torch.nn.Module):
    """CPU dry runs only: the published model with its output cast to fp16, which is what its CUDA
    autocast returns on a GPU; its sampler writes that output into an fp16 cache and fails on fp32.
    Rows that used it say so (``CPU_NOTE``)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config, self.dtype = model.config, model.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).to(torch.float16)


CPU_NOTE = "CPU: published model output cast to fp16 for its sampler's fp16 cache (its CUDA autocast does this)"


def sample_cached(pub: Published, model, noise, num: int, length: int, steps: int, seed: int,
                  method: str = "tweedie") -> tuple[torch.Tensor, float]:
    """Its DiffusionSampler, direct strategy: (tokens [num, length], E-NFE = update_cnt / num).

    update_cnt counts, after each step, the rows that changed: the evaluations of the next step
    (the first evaluation of every row is not counted, the rows changed by the last step are)."""
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    if device.type == "cpu":
        model = HalfOutputOnCPU(model)
    sampler = pub.sampling.DiffusionSampler(method, model, noise, (num, length), token_dim(model), "direct",
                                            device=device)
    with quiet():
        x = sampler.sample(steps)
    return x, sampler.update_cnt / num


@torch.no_grad()
def sample_without_cache(pub: Published, model, noise, num: int, length: int, steps: int, seed: int,
                         method: str = "tweedie") -> tuple[torch.Tensor, float]:
    """The published direct step with its per-row cache taken out: ``model(x)`` on every row at every
    step (E-NFE = steps), probabilities stored in fp16 as its cache stores them, its update rate
    (``DiffusionSampler.get_update_rate``, 1 + 1e-3 at the last step) and its ``sample_categorical``."""
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    V = token_dim(model)
    sampler = pub.sampling.DiffusionSampler(method, model, noise, (num, length), V, "direct", device=device)
    model.eval()
    x = torch.full((num, length), V - 1, dtype=torch.int64, device=device)
    times = torch.linspace(1, sampler.eps, steps + 1, device=device)
    with quiet():
        for i in range(steps):
            rate = sampler.get_update_rate(times[i], steps) if i < steps - 1 else 1 + 1e-3
            masked = x == V - 1
            probs = model(x).exp().to(torch.float16)[masked] * rate  # [M, V]
            probs[..., -1] = 1 - rate  # stay masked
            x[masked] = pub.catsample.sample_categorical(probs.to(torch.float32))
    return x, float(steps)


def eval_fn(pub: Published, model, noise, batch: torch.Tensor, mc_timesteps: int, loss_type: str = "lambda_DCE"):
    """The per-batch loss of evaluation_modeling.py: mean over ``mc_timesteps`` draws of its loss."""
    loss_fn = pub.losses.get_loss_fn(noise, token_dim(model), False, loss_type=loss_type)

    @torch.no_grad()
    def evaluate() -> torch.Tensor:
        with quiet():
            total = 0.0
            for _ in range(mc_timesteps):
                total += loss_fn(model, batch).mean()
            return total / mc_timesteps

    return evaluate
