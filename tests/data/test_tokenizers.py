"""Tokenizers (radd_fast/data/tokenizers.py): the byte tokenizer's round trip, a Hugging Face tokenizer
from a local folder, and the one rule every CLI uses for a tokenizer that does not fit the model."""
import pytest

from radd_fast.data import ByteTokenizer, get_tokenizer
from radd_fast.data.tokenizers import tokenizer_mismatch


def test_byte_tokenizer_roundtrip():
    tok = get_tokenizer("bytes")
    text = "naïve café — 東京\n"
    ids = tok.encode(text)
    assert tok.vocab_size == 256 and max(ids) < 256 and tok.eos_token_id not in ids
    assert tok.decode(ids) == text
    assert tok.batch_decode([ids + [tok.eos_token_id] + ids]) == [text + "<|endoftext|>" + text]

def test_hf_tokenizer_from_local_folder(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    bpe.train_from_iterator(["the cat sat on the mat"] * 10,
                            tokenizers.trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<eos>"]))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", unk_token="<unk>").save_pretrained(tmp_path)
    tok = get_tokenizer(str(tmp_path))
    assert tok.eos_token_id == 1 and tok.vocab_size <= 60
    assert tok.decode(tok.encode("the cat")) == "the cat"
    assert tok.identity != ByteTokenizer.identity
    with pytest.raises(ValueError, match="could not load tokenizer"):
        get_tokenizer(str(tmp_path / "missing"))

def test_tokenizer_mismatch_is_one_rule_for_every_cli():
    """Every id a model token (train, eval); and every token an id when sampling (exact)."""
    assert tokenizer_mismatch(256, 256, "bytes", exact=True) is None
    assert tokenizer_mismatch(256, 300, "bytes", exact=False) is None  # spare model tokens: fine to train on
    assert tokenizer_mismatch(256, 300, "bytes", exact=True) == \
        "the model has 300 tokens but tokenizer 'bytes' decodes only 256 ids"
    assert tokenizer_mismatch(50257, 256, "gpt2", exact=False) == \
        "tokenizer 'gpt2' has 50257 ids but the model only 256 tokens"
