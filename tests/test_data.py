"""Data: tokenizers, the published detokenizers, token blocks from every source kind, the cache,
the resumable sharded loader, and clear errors. All offline."""
import json

import numpy as np
import pytest
import torch

from radd_fast.data import (
    ByteTokenizer,
    DataError,
    ResumableLoader,
    TokenBlocks,
    get_tokenizer,
    lambada_detokenizer,
    lm1b_detokenizer,
    load_blocks,
    ptb_detokenizer,
    wikitext_detokenizer,
)
from radd_fast.data import datasets as datasets_module
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


def test_detokenizers():
    assert wikitext_detokenizer(" = = Early life = = \n") == " == Early life ==\n"
    assert wikitext_detokenizer("1 @,@ 000 people , in the ( old city ) . It 's 3 @.@ 5 m") == \
        "1,000 people, in the (old city). It's 3.5 m"
    assert ptb_detokenizer("he does n't pay $ 1 million") == "he doesn't pay $1 million"
    assert ptb_detokenizer("about N shares") == "about 1 shares"  # published: " N " -> " 1 "
    assert lm1b_detokenizer('He said : " it is fine " , then left .') == 'He said: "it is fine", then left.'
    assert lm1b_detokenizer("see http : / / example.com ( now ) !") == "see http://example.com (now)!"
    assert lambada_detokenizer("  \u201cHi,\u201d she said.  ") == '\n"Hi," she said.'


def stream(tok, docs):
    return [t for d in docs for t in (*tok.encode(d), tok.eos_token_id)]


def test_text_sources_documents_eos_blocks_remainder_dropped(tmp_path):
    tok = ByteTokenizer()
    (tmp_path / "one.txt").write_text("hello world, hello blocks")
    blocks = load_blocks(str(tmp_path / "one.txt"), "train", tok, length=8, cache_dir=tmp_path / "c")
    expected = stream(tok, ["hello world, hello blocks"])  # 26 tokens -> 3 blocks of 8, 2 dropped
    assert len(blocks) == 3 and blocks.n_tokens == 24
    assert blocks[np.arange(3)].tolist() == np.array(expected[:24]).reshape(3, 8).tolist()

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "b.txt").write_text("second")
    (folder / "a.txt").write_text("first")
    blocks = load_blocks(str(folder), "train", tok, length=4, cache_dir=tmp_path / "c")
    assert blocks[np.arange(len(blocks))].ravel().tolist() == stream(tok, ["first", "second"])[:12]

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in ["ab", "cde", "f"]) + "\n")
    blocks = load_blocks(str(jsonl), "train", tok, length=3, cache_dir=tmp_path / "c")
    assert blocks[np.arange(3)].ravel().tolist() == stream(tok, ["ab", "cde", "f"])[:9]


def test_pretokenised_streams_are_memory_mapped(tmp_path):
    tokens = np.arange(100, dtype=np.uint32) * 1000  # ids above 65535 need uint32
    np.save(tmp_path / "toks.npy", tokens)
    blocks = load_blocks(str(tmp_path / "toks.npy"), "train", ByteTokenizer(), length=10)
    assert isinstance(blocks.tokens, np.memmap) and len(blocks) == 10
    assert blocks[np.array([9])].tolist() == [list(range(90_000, 100_000, 1000))]
    np.arange(50, dtype=np.uint16).tofile(tmp_path / "toks.bin")  # nanoGPT layout: raw uint16
    blocks = load_blocks(str(tmp_path / "toks.bin"), "train", ByteTokenizer(), length=7)
    assert len(blocks) == 7 and blocks[np.array([1])].tolist() == [list(range(7, 14))]


def test_cache_is_written_once_and_keyed_on_content(tmp_path, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text("abcdefgh" * 4)
    tok = ByteTokenizer()
    first = load_blocks(str(path), "train", tok, length=8, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.bin"))) == 1
    assert not list((tmp_path / "cache").glob("*.tmp*"))  # no temporary left behind

    def boom(texts):
        raise AssertionError("re-tokenised a cached source")

    monkeypatch.setattr(tok, "encode_batch", boom)
    again = load_blocks(str(path), "train", tok, length=8, cache_dir=tmp_path / "cache")
    assert np.array_equal(first[np.arange(4)], again[np.arange(4)])
    monkeypatch.undo()
    path.write_text("ABCDEFGH" * 5)  # new content: a new cache entry
    changed = load_blocks(str(path), "train", tok, length=8, cache_dir=tmp_path / "cache")
    assert changed[np.array([0])].tolist() == [list(b"ABCDEFGH")]


def test_hub_corpus_is_detokenised_tokenised_and_cached(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name, split, cache_dir):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"text": ["a @-@ b , c", "", "d ."]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(datasets_module, "hub_reachable", lambda: True)  # never probe the network in tests
    tok = ByteTokenizer()
    blocks = load_blocks("wikitext2", "validation", tok, length=4, cache_dir=tmp_path, num_proc=None)
    assert calls == [("wikitext", "wikitext-2-raw-v1", "validation")]
    expected = stream(tok, ["a-b, c", "", "d ."])  # every row a document, empty rows too (as published)
    assert blocks[np.arange(len(blocks))].ravel().tolist() == expected[: len(expected) // 4 * 4]
    load_blocks("wikitext2", "validation", tok, length=4, cache_dir=tmp_path, num_proc=None)
    assert len(calls) == 1  # cached


def test_hub_corpus_without_network_fails_at_once(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(datasets_module, "hub_reachable", lambda: False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the hub client was called"))
    with pytest.raises(DataError, match="hub cannot be reached .*pass a local text file"):
        load_blocks("ptb", "test", ByteTokenizer(), length=4, cache_dir=tmp_path)


def test_data_errors(tmp_path):
    tok = ByteTokenizer()
    with pytest.raises(DataError, match="unknown dataset 'openwebtxt'.*openwebtext"):
        load_blocks("openwebtxt", "train", tok, 8, tmp_path)
    with pytest.raises(DataError, match="has no split 'train'"):
        load_blocks("lambada", "train", tok, 8, tmp_path)
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(DataError, match="5 tokens, fewer than one block of 8"):
        load_blocks(str(tmp_path / "short.txt"), "train", tok, 8, tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_blocks(str(tmp_path / "empty.jsonl"), "train", tok, 8, tmp_path)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported file type"):
        load_blocks(str(tmp_path / "x.csv"), "train", tok, 8, tmp_path)
    (tmp_path / "nodocs").mkdir()
    with pytest.raises(DataError, match="holds no .txt files"):
        load_blocks(str(tmp_path / "nodocs"), "train", tok, 8, tmp_path)


def blocks_of(n, length=2):
    return TokenBlocks(np.arange(n * length, dtype=np.int64), length, "numbers")


def test_loader_shards_the_global_batch_without_overlap():
    one = ResumableLoader(blocks_of(40), batch_size=8, seed=1)
    ranks = [ResumableLoader(blocks_of(40), batch_size=8, seed=1, rank=r, world=2, accum=2) for r in range(2)]
    for _ in range(7):  # crosses an epoch boundary (5 batches per epoch)
        (_, full), = one.next_step()
        parts = {m: x for loader in ranks for m, x in loader.next_step()}
        assert sorted(parts) == [0, 1, 2, 3] and all(x.shape == (2, 2) for x in parts.values())
        assert torch.equal(torch.cat([parts[m] for m in range(4)]), full)
    assert one.state_dict() == {"epoch": 1, "batch": 2}


def test_loader_resumes_exactly_and_rejects_bad_positions():
    a = ResumableLoader(blocks_of(30), batch_size=4, seed=5)
    for _ in range(9):
        a.next_step()
    b = ResumableLoader(blocks_of(30), batch_size=4, seed=5)
    b.load_state_dict(a.state_dict())
    for _ in range(10):
        assert torch.equal(a.next_step()[0][1], b.next_step()[0][1])
    with pytest.raises(DataError, match="does not fit this data source"):
        b.load_state_dict({"epoch": 0, "batch": 99})
    with pytest.raises(DataError, match="fewer than one batch"):
        ResumableLoader(blocks_of(3), batch_size=4)
    with pytest.raises(ValueError, match="not divisible"):
        ResumableLoader(blocks_of(30), batch_size=4, world=3)


def test_cache_file_name_is_stable(tmp_path):
    tok = ByteTokenizer()
    p1 = datasets_module.cache_path({"source": "x"}, "x", "train", tok, tmp_path)
    p2 = datasets_module.cache_path({"source": "x"}, "x", "train", tok, tmp_path)
    p3 = datasets_module.cache_path({"source": "y"}, "x", "train", tok, tmp_path)
    assert p1 == p2 != p3 and p1.name.endswith(".uint16.bin")


def test_tokenizer_mismatch_is_one_rule_for_every_cli():
    """Every id a model token (train, eval); and every token an id when sampling (exact)."""
    assert tokenizer_mismatch(256, 256, "bytes", exact=True) is None
    assert tokenizer_mismatch(256, 300, "bytes", exact=False) is None  # spare model tokens: fine to train on
    assert tokenizer_mismatch(256, 300, "bytes", exact=True) == \
        "the model has 300 tokens but tokenizer 'bytes' decodes only 256 ids"
    assert tokenizer_mismatch(50257, 256, "gpt2", exact=False) == \
        "tokenizer 'gpt2' has 50257 ids but the model only 256 tokens"
