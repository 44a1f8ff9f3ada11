"""Evaluate RADD checkpoints: zero-shot perplexity, or the generative perplexity of samples.

    python eval.py --model_path JingyangOu/radd-lambda-dce --valid_dataset wikitext2 \
        --loss_type lambda_DCE --monte_carlo_timesteps 1024 --batch_size 16 --length 1024 --ngpus 1
    python eval.py --gen_ppl samples.jsonl --eval_model gpt2-large --work_dir out/

All flags: ``python eval.py --help``; the code lives in radd_fast/evaluation/cli.py.
"""
import sys

from radd_fast.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
