"""Sample text from a RADD checkpoint (the published run_sample.py flags, plus a few).

    python sample.py --model_path JingyangOu/radd-t-dce --batch_size 8 --steps 1024
    python sample.py --model_path runs/tiny --tokenizer bytes --batch_size 4 --steps 128 --out out/samples.jsonl

All flags: ``python sample.py --help``; the code lives in radd_fast/sampling/cli.py.
"""
import sys

from radd_fast.sampling.cli import main

if __name__ == "__main__":
    sys.exit(main())
