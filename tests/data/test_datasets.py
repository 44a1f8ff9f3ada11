"""Token blocks (radd_fast/data/datasets.py) from every source kind (text file, folder, JSONL, token
arrays, a hub corpus), detokenised when asked; the cache; and clear errors. All offline."""
import json

import numpy as np
import pytest

from radd_fast.data import ByteTokenizer, DataError, load_blocks, ptb_detokenizer
from radd_fast.data import datasets as datasets_module
from radd_fast.files import WriteError
from tests.support.faults import full_disk


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

class WideTokenizer(ByteTokenizer):
    """Ids above 65535 (a token file's ids must be the tokenizer's)."""
    name, vocab_size = "wide", 100_000


def test_pretokenised_streams_are_memory_mapped(tmp_path):
    tokens = np.arange(100, dtype=np.uint32) * 1000  # ids above 65535 need uint32
    np.save(tmp_path / "toks.npy", tokens)
    blocks = load_blocks(str(tmp_path / "toks.npy"), "train", WideTokenizer(), length=10)
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
    files = list((tmp_path / "cache").iterdir())  # hidden ones too: no temporary left behind
    assert len(files) == 1 and files[0].name.endswith(".uint16.bin")

    def boom(texts):
        raise AssertionError("re-tokenised a cached source")

    monkeypatch.setattr(tok, "encode_batch", boom)
    again = load_blocks(str(path), "train", tok, length=8, cache_dir=tmp_path / "cache")
    assert np.array_equal(first[np.arange(4)], again[np.arange(4)])
    monkeypatch.undo()
    path.write_text("ABCDEFGH" * 5)  # new content: a new cache entry
    changed = load_blocks(str(path), "train", tok, length=8, cache_dir=tmp_path / "cache")
    assert changed[np.array([0])].tolist() == [list(b"ABCDEFGH")]

def test_cache_file_name_is_stable(tmp_path):
    tok = ByteTokenizer()
    p1 = datasets_module.cache_path({"source": "x"}, "x", "train", tok, tmp_path)
    p2 = datasets_module.cache_path({"source": "x"}, "x", "train", tok, tmp_path)
    p3 = datasets_module.cache_path({"source": "y"}, "x", "train", tok, tmp_path)
    assert p1 == p2 != p3 and p1.name.endswith(".uint16.bin")

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

def test_a_full_disk_while_caching_is_one_error_naming_the_cache_file(tmp_path, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text("abcdefgh" * 4)
    full_disk(monkeypatch, tmp_path / "cache", free=10)
    with pytest.raises(WriteError) as e:
        load_blocks(str(path), "train", ByteTokenizer(), length=8, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # no partial cache, no temporary
    target = datasets_module.cache_path({"source": str(path.resolve()), "stamp": datasets_module._file_stamp(path)},
                                        "t", "train", ByteTokenizer(), tmp_path / "cache")
    assert str(e.value) == (f"no space left on device while writing {target}: nothing is cached yet; free some space, "
                            f"or point data.cache_dir (train.py) / --cache_dir (eval.py) at a folder with room")


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


def test_a_local_stand_in_is_detokenised_when_asked(tmp_path):
    text = tmp_path / "ptb.txt"
    text.write_text("he does n't pay $ N")
    tok = ByteTokenizer()
    plain = load_blocks(str(text), "test", tok, length=1, cache_dir=tmp_path)
    detok = load_blocks(str(text), "test", tok, length=1, cache_dir=tmp_path, detokenizer=ptb_detokenizer)
    as_text = lambda b: bytes(b[np.arange(len(b))].ravel().tolist()[:-1]).decode()  # noqa: E731 (drop EOS)
    assert as_text(plain) == "he does n't pay $ N" and as_text(detok) == "he doesn't pay $ N"
