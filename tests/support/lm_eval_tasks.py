"""Offline lm-evaluation-harness tasks: local YAML files over local JSONL data, and a byte-level checkpoint.

Three tasks, one per request type of the harness, each small enough for a CPU test:
``tiny_lambada`` (loglikelihood of a sentence's last word, as LAMBADA), ``tiny_rolling``
(loglikelihood_rolling of whole texts, as WikiText) and ``tiny_generate`` (generate_until a
newline). The checkpoint: the evaluation tests' byte model (256 tokens, length 32), whose config
names no tokenizer, so its default is ``bytes``.
"""
from __future__ import annotations

import json
from pathlib import Path

from tests.support.models import eval_model

LAMBADA_TEXTS = ["the cat sat on the mat", "a dog ran to the park", "we ate bread and jam", "she read a long book",
                 "it rained all day"]
# Longer than the model's 32 tokens: two full windows and a partial one, one full window exactly, a short text.
ROLLING_TEXTS = ["the quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire all night",
                 "thirty two bytes of text exactly",
                 "short"]
GENERATE_PROMPTS = [{"text": "once upon a", "target": " time"}, {"text": "hello", "target": " world"}]

TASKS = {
    "tiny_lambada": (LAMBADA_TEXTS, """output_type: loglikelihood
doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' '+text.split(' ')[-1]}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""),
    "tiny_rolling": (ROLLING_TEXTS, """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""),
    "tiny_generate": (GENERATE_PROMPTS, """output_type: generate_until
doc_to_text: "{{text}}"
doc_to_target: "{{target}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""),
}


def write_tasks(root: Path) -> Path:
    """The three task YAMLs and their JSONL data in ``root / "tasks"``; returns that folder (the harness's
    ``include_path``). The datasets library caches what it reads in ``root / "cache"``, not the user's cache."""
    folder = root / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    for name, (docs, body) in TASKS.items():
        data = folder / f"{name}.jsonl"
        rows = [doc if isinstance(doc, dict) else {"text": doc} for doc in docs]
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        header = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
                  f"  cache_dir: {json.dumps(str(root / 'cache'))}\ntest_split: test\n")
        (folder / f"{name}.yaml").write_text(header + body + "metadata:\n  version: 1.0\n")
    return folder


def write_byte_checkpoint(folder: Path) -> Path:
    """The evaluation tests' byte model (tokens 256, length 32) in the hub layout; returns the folder."""
    eval_model().save_pretrained(folder)
    return folder
