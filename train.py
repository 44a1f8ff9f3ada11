"""Train RADD. Hydra entry point; configs/config.yaml documents every key.

    python train.py model=tiny tokenizer=bytes tokens=256 data.train=input.txt data.valid=input.txt
    torchrun --nproc_per_node 8 train.py training.accum=1
    python train.py load_dir=runs/2026.01.01/120000            # resume

The code lives in radd_fast/training/cli.py.
"""
import sys

from radd_fast.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
