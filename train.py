"""Train RADD (spec 8). Hydra entry point; configs/config.yaml documents every key.

    python train.py model=tiny tokenizer=bytes tokens=256 data.train=input.txt data.valid=input.txt
    torchrun --nproc_per_node 8 train.py training.accum=1
    python train.py load_dir=runs/2026.01.01/120000            # resume

Under torchrun every rank runs this file; only rank 0 lets Hydra create the run
folder, and it tells the other ranks where it is.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from radd_fast.training import train
from radd_fast.training.distributed import cleanup, init_distributed

OmegaConf.register_new_resolver(
    "run_dir", lambda load_dir, new: f"{load_dir}/resumes/{Path(new).parent.name}_{Path(new).name}" if load_dir
    else new, replace=True)

if int(os.environ.get("RANK", "0")) != 0:  # ranks > 0 write nothing of Hydra's
    sys.argv[1:1] = ["hydra.output_subdir=null", "hydra.run.dir=."]


def resume_config(load_dir: str):
    """The run's own config, with this call's command-line overrides (except load_dir) on top."""
    saved = Path(load_dir) / ".hydra" / "config.yaml"
    if not saved.exists():
        raise FileNotFoundError(f"load_dir={load_dir}: no {saved}; is it a run folder?")
    overrides = [o.lstrip("+") for o in HydraConfig.get().overrides.task
                 if not o.lstrip("+").startswith(("load_dir=", "hydra."))]
    return OmegaConf.merge(OmegaConf.load(saved), OmegaConf.from_dotlist(overrides))


@hydra.main(version_base=None, config_path="configs", config_name="config")
def main(cfg) -> None:
    env = init_distributed()
    try:
        if cfg.load_dir:
            run_dir = Path(cfg.load_dir)
            cfg = resume_config(cfg.load_dir)
        else:
            run_dir = Path(HydraConfig.get().runtime.output_dir)
        if env.world > 1:  # rank 0's folder for everyone
            shared = [str(run_dir)]
            dist.broadcast_object_list(shared, src=0)
            run_dir = Path(shared[0])
        history = train(OmegaConf.to_container(cfg, resolve=True), run_dir)
        if env.is_main:
            print(f"done: step {history['step']}, run folder {run_dir}")
    finally:
        cleanup(env)


if __name__ == "__main__":
    main()
