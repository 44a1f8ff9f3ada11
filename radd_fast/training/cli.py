"""The training CLI (``python train.py`` / ``python -m radd_fast.training.cli``): Hydra composes
configs/config.yaml and the command-line overrides, ``train`` runs.

    python train.py model=tiny tokenizer=bytes tokens=256 data.train=input.txt data.valid=input.txt
    torchrun --nproc_per_node 8 train.py training.accum=1
    python train.py load_dir=runs/2026.01.01/120000            # resume

Under torchrun every rank runs this; only rank 0 lets Hydra write the run folder
(ranks > 0 get ``hydra.output_subdir=null hydra.run.dir=.`` added to their overrides)
and rank 0 tells the others where it is. Every user error (an unknown flag, a bad
override key or value, a missing data file or load_dir, a ConfigError of the run
config) is one ``error: ...`` line and exit code 2, as in sample.py and eval.py: the
command line is read first by Hydra's own flags in the shared raising parser
(``errors.ArgParser``); ``--debug`` or ``RADD_DEBUG=1`` shows the traceback. What Hydra
would act on is checked before it starts: a ``load_dir`` that is not a run folder, and a
run folder that another process is training in (``lock.py``; the run itself then holds the lock).
A full disk while Hydra writes ``.hydra/`` is one line too (``hydra_raises``; every other file of
the run is written through ``radd_fast.files``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import OmegaConf

from ..config import PRESETS, ConfigError
from ..distributed import broadcast_object, cleanup, init_distributed
from ..errors import ArgParser, UserError, run_cli
from ..files import write_errors
from .lock import LOCK_NAME, check_run_folder_free
from .loop import train

# configs/ sits beside the package in the checkout (train.py runs from there).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIG_NAME = "config"
# Ranks > 0 compose the same config but write nothing: no .hydra folder, no run folder of their own.
QUIET_RANK_OVERRIDES = ("hydra.output_subdir=null", "hydra.run.dir=.")
# A full disk while Hydra writes .hydra/ (before the first step): the one line's advice.
HYDRA_FILES_ADVICE = "nothing was trained; free some space and run again"
# Hydra's own flags that take the next argument as their value (not an override).
HYDRA_FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                          "--config-dir", "-cd", "--info", "-i", "--experimental-rerun")


def _run_dir(load_dir, new: str) -> str:
    """hydra.run.dir: a new run's own folder, or for a resume ``<load_dir>/resumes/<date>_<time>``."""
    return f"{load_dir}/resumes/{Path(new).parent.name}_{Path(new).name}" if load_dir else new


OmegaConf.register_new_resolver("run_dir", _run_dir, replace=True)


def register_model_presets() -> None:
    """``model=tiny|small|medium`` are ``radd_fast.PRESETS`` themselves (Hydra's config group "model"):
    the sizes live once, in radd_fast/config.py. Training runs them on ``backend: auto`` (the fast
    kernels on CUDA, the reference ops elsewhere), the backend a preset leaves to its user."""
    store = ConfigStore.instance()
    for name, preset in PRESETS.items():
        store.store(group="model", name=name, node={**dataclasses.asdict(preset), "backend": "auto"})


register_model_presets()


def main(argv=None) -> int:
    """``train.py``'s entry point: 0 when the run finished, 2 (one ``error:`` line) on a user error."""
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    if not (CONFIG_DIR / f"{CONFIG_NAME}.yaml").exists():
        raise ConfigError(f"no {CONFIG_NAME}.yaml in {CONFIG_DIR}: train.py runs from a radd-fast checkout")
    build_parser().parse_args(argv)  # an unknown flag or a missing value: one line, before Hydra prints its usage
    rank = int(os.environ.get("RANK", "0"))
    composed = check_overrides(task_overrides(argv))
    check_load_dir(composed.load_dir)  # before Hydra makes <load_dir>/resumes/...
    run_dir = Path(str(composed.hydra.run.dir))  # resolved once (its ${now:...}): Hydra is told this folder
    made = None
    if rank == 0:  # before Hydra writes .hydra/ into a folder that another run is writing
        check_run_folder_free(composed.load_dir or run_dir)
        made = first_missing_folder(run_dir)
        argv = pin_run_dir(argv, run_dir)
    failure: list[UserError] = []
    saved = sys.argv
    # @hydra.main reads its arguments from sys.argv: this call's, restored below.
    sys.argv = [saved[0] if saved else "train.py", *hydra_arguments(argv, rank)]
    try:
        with hydra_raises(), write_errors(run_dir / ".hydra", HYDRA_FILES_ADVICE):
            _hydra_entry(failure)
    except UserError as e:  # Hydra's own writes of .hydra/ on a full disk
        failure.append(e)
    finally:
        sys.argv = saved
    if failure:  # raised inside the task, where Hydra would print it with a traceback
        if made is not None:
            remove_if_unstarted(made, run_dir)
        raise failure[0]
    return 0


@contextlib.contextmanager
def hydra_raises():
    """Hydra prints an exception of its job (its own writes of .hydra/ included) as a traceback and exits
    1; with HYDRA_FULL_ERROR set it raises it to us instead, where a full disk is one line."""
    saved = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved


def pin_run_dir(argv: list[str], run_dir: Path) -> list[str]:
    """The arguments with ``hydra.run.dir`` set to the folder resolved before Hydra starts (quoted for
    Hydra's override grammar), so the folder that is checked (and removed if refused) is Hydra's."""
    quoted = "'" + str(run_dir).replace("'", "\\'") + "'"
    return [a for a in argv if not a.startswith("hydra.run.dir=")] + [f"hydra.run.dir={quoted}"]


def first_missing_folder(path: Path) -> Path | None:
    """The outermost folder of ``path`` (``path`` itself included) that does not exist yet: what a run
    creates there. None when ``path`` exists."""
    missing = None
    for folder in [path, *path.parents]:
        if folder.exists():
            return missing
        missing = folder
    return missing


# What Hydra and the loop write before the first training step (the config, an empty log, the lock).
STARTED_NOTHING = {".hydra", "logs", LOCK_NAME}


def remove_if_unstarted(made: Path, run_dir: Path) -> None:
    """A refused run leaves nothing: remove ``made`` (the folders this call created, ``run_dir`` inside
    them) when ``run_dir`` holds only what is written before the first step; a run that saved a step or a
    checkpoint keeps its folder (its error says how to resume)."""
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= STARTED_NOTHING:
        shutil.rmtree(made, ignore_errors=True)


def build_parser() -> ArgParser:
    """Hydra's command line (its flags and the key=value overrides) in the shared raising parser: what
    Hydra refuses is refused here first, in one line. The flags are Hydra's own parser's (its
    ``get_args_parser``), so they stay Hydra's whatever its version."""
    return ArgParser(prog="train.py", parents=[get_args_parser()], add_help=False,
                     error_type=ConfigError)


def hydra_arguments(argv: list[str], rank: int) -> list[str]:
    """What Hydra is given: the command line, plus the quiet overrides on ranks > 0."""
    return [*argv, *QUIET_RANK_OVERRIDES] if rank != 0 else list(argv)


def task_overrides(argv: list[str]) -> list[str]:
    """The ``key=value`` overrides among the arguments: Hydra's flags and their values left out."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in HYDRA_FLAGS_WITH_VALUE
        else:
            out.append(arg)
    return out


def check_overrides(overrides: list[str]):
    """Compose the config once with ``overrides``, so a bad key, value or group is one line; returns it
    (with its ``hydra`` section: ``hydra.run.dir`` is the folder a new run will write)."""
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            return compose(config_name=CONFIG_NAME, overrides=overrides, return_hydra_config=True)
    except HydraException as e:
        raise ConfigError(describe_hydra_error(e)) from e


def check_load_dir(load_dir) -> None:
    """A ``load_dir`` (None: a new run) must be a run folder: one line naming it otherwise."""
    if load_dir is None:
        return
    folder = Path(load_dir)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"load_dir={load_dir} is a file; pass the run folder to resume (the one that holds "
                          f".hydra/config.yaml)")
    if not folder.is_dir():
        raise ConfigError(f"load_dir={load_dir}: no such folder")
    if not (folder / ".hydra" / "config.yaml").exists():
        raise ConfigError(f"load_dir={load_dir}: no {folder / '.hydra' / 'config.yaml'}; is it a run folder?")


def describe_hydra_error(error: HydraException) -> str:
    """Hydra's multi-line message as one line: what is wrong and with which override."""
    full_key = getattr(error.__cause__, "full_key", None)
    if full_key and "not in struct" in str(error.__cause__):
        return f"unknown config key {full_key!r} (command-line override); see configs/config.yaml for the keys"
    text = ""
    for line in str(error).splitlines():
        if line.startswith(("Config search path", "See https://")):
            break
        if not line.strip():
            continue
        listed = line.startswith(("\t", " "))  # an indented line is one entry of a list ("Available options")
        sep = "" if not text else (" " if text.endswith(":") else ", " if listed else "; ")
        text += sep + line.strip()
    return text + " (command-line override)"


def _hydra_entry(failure: list) -> None:
    @hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name=CONFIG_NAME)
    def task(cfg) -> None:
        try:
            run(cfg)
        except UserError as e:
            failure.append(e)

    task()


def run(cfg) -> dict:
    """Train (or resume) with the composed config; returns the history (``train``'s)."""
    env = init_distributed()
    try:
        if cfg.load_dir:
            run_dir = Path(cfg.load_dir)
            cfg = resume_config(cfg.load_dir)
        else:
            run_dir = Path(HydraConfig.get().runtime.output_dir)
        run_dir = Path(broadcast_object(str(run_dir), env))  # rank 0's folder for everyone
        history = train(OmegaConf.to_container(cfg, resolve=True), run_dir)
        if env.is_main:
            print(f"done: step {history['step']}, run folder {run_dir}")
        return history
    finally:
        cleanup(env)


def resume_config(load_dir: str):
    """The run's own config, with this call's command-line overrides (except load_dir) on top."""
    check_load_dir(load_dir)
    saved = Path(load_dir) / ".hydra" / "config.yaml"
    overrides = [o.lstrip("+") for o in HydraConfig.get().overrides.task
                 if not o.lstrip("+").startswith(("load_dir=", "hydra."))]
    return OmegaConf.merge(OmegaConf.load(saved), OmegaConf.from_dotlist(overrides))


if __name__ == "__main__":
    sys.exit(main())
