"""Generative perplexity (radd_fast/evaluation/gen_ppl.py): scoring with a causal LM, retokenization,
windows, unigram entropy, the CLI's --gen_ppl mode, and a hub scorer that cannot be had offline.

The scorer is a one-layer GPT-2 with a byte-level BPE tokenizer trained here on a
tiny corpus and saved to a temporary folder: offline, loaded through the same
``AutoModelForCausalLM`` / ``AutoTokenizer`` path as gpt2-large.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from radd_fast.data import ByteTokenizer, HFTokenizer  # noqa: E402
from radd_fast.evaluation import cli, score_samples, unigram_entropy  # noqa: E402
from radd_fast.evaluation.gen_ppl import load_scorer, token_nll  # noqa: E402
from radd_fast.evaluation.protocol import EvalError  # noqa: E402

CORPUS = ["the cat sat on the mat and the dog sat on the log. ", "a quick brown fox jumps over a lazy dog! "]
TEXTS = ["the cat sat on the log", "a lazy fox jumps over the mat and the dog sat on a cat", "dog dog dog"]
CTX = 16


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_gpt2")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS * 10, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    eos = tok.eos_token_id
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=CTX, vocab_size=len(tok), bos_token_id=eos,
                     eos_token_id=eos)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def scorer(scorer_dir):
    return load_scorer(str(scorer_dir), "cpu")


def direct_ppl(model, tokenizer, text: str) -> float:
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    assert ids.shape[1] <= CTX
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    return math.exp(F.cross_entropy(logits.float(), ids[0, 1:]).item())


def test_unigram_entropy():
    assert unigram_entropy([7] * 50) == 0.0
    assert unigram_entropy([]) == 0.0
    assert unigram_entropy([1, 2, 3, 4]) == pytest.approx(math.log(4))
    assert unigram_entropy([5, 5, 9, 9]) == pytest.approx(math.log(2))


def test_text_samples_match_a_direct_computation(scorer):
    model, tok = scorer
    res = score_samples([{"text": t} for t in TEXTS], scorer, progress=False, batch_size=2)
    expected = [direct_ppl(model, tok, t) for t in TEXTS]
    assert [p["ppl"] for p in res["per_sample"]] == pytest.approx(expected, rel=1e-4)
    assert res["mean_ppl"] == pytest.approx(sum(expected) / len(expected), rel=1e-4)
    assert res["retokenized"] is True  # text is always tokenised by the scorer


def test_padding_does_not_change_scores(scorer):
    one = score_samples([{"text": t} for t in TEXTS], scorer, progress=False, batch_size=1)
    many = score_samples([{"text": t} for t in TEXTS], scorer, progress=False, batch_size=8)
    assert [p["ppl"] for p in many["per_sample"]] == pytest.approx([p["ppl"] for p in one["per_sample"]], rel=1e-4)


def test_ids_of_another_tokenizer_are_retokenized(scorer):
    byte_tok = ByteTokenizer()
    by_ids = score_samples([{"ids": byte_tok.encode(t)} for t in TEXTS], scorer, byte_tok, progress=False)
    by_text = score_samples([{"text": t} for t in TEXTS], scorer, progress=False)
    assert by_ids["retokenized"] is True
    assert [p["ppl"] for p in by_ids["per_sample"]] == pytest.approx([p["ppl"] for p in by_text["per_sample"]])
    # entropy is taken over the sampler's own ids (bytes here), not the scorer's tokens
    assert by_ids["per_sample"][0]["entropy"] == pytest.approx(unigram_entropy(byte_tok.encode(TEXTS[0])))


def test_ids_of_the_same_vocabulary_are_used_as_is(scorer, scorer_dir):
    _, tok = scorer
    sample_tok = HFTokenizer(str(scorer_dir))  # another object, same vocabulary
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    res = score_samples([{"ids": i} for i in ids], scorer, sample_tok, progress=False)
    assert res["retokenized"] is False
    text = score_samples([{"text": t} for t in TEXTS], scorer, progress=False)
    assert [p["ppl"] for p in res["per_sample"]] == pytest.approx([p["ppl"] for p in text["per_sample"]])


def test_long_samples_are_scored_in_windows(scorer):
    model, _ = scorer
    seq = list(range(5, 5 + 3 * CTX + 3))  # longer than the scorer's context of CTX tokens
    ((total, count),) = token_nll(model, [seq])
    assert count == len(seq) - 1 and math.isfinite(total)
    # windows overlap by one token: the second window predicts its tokens from its own start
    ((t2, c2),) = token_nll(model, [seq[:CTX]])
    ((t3, c3),) = token_nll(model, [seq[CTX - 1:2 * CTX - 1]])
    ((t12, c12),) = token_nll(model, [seq[:2 * CTX - 1]])
    assert c12 == c2 + c3 and t12 == pytest.approx(t2 + t3, rel=1e-5)


def test_constant_sample_has_zero_entropy(scorer):
    res = score_samples([{"text": "dog " * 8}, {"ids": [3] * 20, "text": "x"}], scorer, progress=False)
    assert res["per_sample"][1]["entropy"] == 0.0
    assert res["per_sample"][0]["entropy"] > 0.0  # scorer tokens: "dog", " dog", ...
    assert math.isfinite(res["mean_ppl"])


def test_cli_gen_ppl(scorer_dir, tmp_path, capsys):
    samples = tmp_path / "samples.jsonl"
    byte_tok = ByteTokenizer()
    lines = [{"ids": byte_tok.encode(t), "text": t} for t in TEXTS] + [{"ids": [100] * 30}]
    samples.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    argv = ["--gen_ppl", str(samples), "--eval_model", str(scorer_dir), "--tokenizer", "bytes",
            "--work_dir", str(tmp_path / "out"), "--device", "cpu", "--no_progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "Generative PPL: " in out and "Unigram entropy: " in out
    res = json.loads((tmp_path / "out" / "gen_ppl_samples.json").read_text())
    assert res["num_samples"] == 4 and len(res["per_sample"]) == 4 and res["retokenized"] is True
    assert res["per_sample"][3]["entropy"] == 0.0  # the constant sample
    assert res["mean_entropy"] == pytest.approx(sum(p["entropy"] for p in res["per_sample"]) / 4)
    assert math.isfinite(res["mean_ppl"]) and res["settings"]["eval_model"] == str(scorer_dir)

    samples.write_text('{"text": "fine"}\nnot json\n')
    assert cli.main(argv) == 2
    assert "samples.jsonl:2: not valid JSON" in capsys.readouterr().err


def test_a_hub_scorer_offline_fails_at_once(monkeypatch):
    """No network (HF_HUB_OFFLINE) and not cached: one line saying what to pass, no hub retries."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)  # not cached here
    with pytest.raises(EvalError, match="HF_HUB_OFFLINE is set; pass --scorer <local folder"):
        load_scorer("gpt2-large", "cpu")


def test_an_absurd_finite_loss_gives_an_infinite_ppl(scorer_dir):
    """A scorer whose output weights are scaled by 1e4: finite NLLs of thousands of nats per token, past
    exp's range, give PPL inf per sample, in the mean and the spread, never an OverflowError."""
    model, tok = load_scorer(str(scorer_dir), "cpu")
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)
    res = score_samples([{"text": t} for t in TEXTS], (model, tok), progress=False)
    nll = [p["nll"] for p in res["per_sample"]]
    assert all(math.isfinite(n) for n in nll) and max(nll) > 710, nll
    assert res["mean_ppl"] == math.inf and res["std_ppl"] == math.inf and res["stderr_ppl"] == math.inf
    assert [p["ppl"] for p in res["per_sample"]] == [math.exp(n) if n < 709 else math.inf for n in nll]
