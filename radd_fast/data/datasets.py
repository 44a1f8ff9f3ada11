"""Token blocks for training and evaluation.

A source is one of
- a Hugging Face corpus by name: ``openwebtext``, ``wikitext103``, ``wikitext2``,
  ``ptb``, ``lm1b``, ``lambada`` (needs the ``datasets`` package);
- a local text source: a ``.txt`` file (one document), a folder of ``.txt`` files
  (one document each, sorted by name), or a ``.jsonl`` file (one document per
  line, field ``text``);
- a pre-tokenised flat token stream, memory-mapped: ``.npy`` (uint16 / uint32 /
  int32, dtype from the header) or ``.bin`` (raw uint16, the nanoGPT layout).
  It is used as is: it must already hold the EOS separators.

Local files are read by ``sources.py``: malformed text, JSONL or token files (not UTF-8,
a bad line, a partial id, an id outside the tokenizer's vocabulary) are a ``DataError``
naming the file and the line or byte offset, before any training or evaluation.

Text is detokenised (evaluation corpora, as published; a local file only when a
``detokenizer`` is passed, e.g. a stand-in for a corpus), tokenised, each document
followed by EOS, all concatenated, and cut into blocks of ``length`` tokens; the
remainder is dropped. Tokenised text is cached once under ``cache_dir`` as a raw
uint16/uint32 stream keyed by source, split, tokenizer and detokenizer, written
to a temporary file, fsynced and renamed (``radd_fast.files``), so a half-written cache
is never read; a full disk is one error line naming the cache file.
The blocks are views of the memory map: a 9B-token corpus costs no RAM.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..files import atomic_write
from ..hub import hub_offline, hub_reachable
from .detokenizers import DETOKENIZERS, detokenizer_identity
from .sources import DataError, jsonl_documents, map_token_file, read_text

CACHE_VERSION = 1
CACHE_ADVICE = ("nothing is cached yet; free some space, or point data.cache_dir (train.py) / --cache_dir "
                "(eval.py) at a folder with room")


@dataclass(frozen=True)
class HFCorpus:
    path: str
    name: str | None
    text_field: str
    splits: dict  # our split name -> the hub's split expression


# Published corpora. OpenWebText has only a train split: its last 100k documents are held out
# as 'validation'. lm1b's and LAMBADA's evaluation split is 'test'.
HF_CORPORA = {
    "openwebtext": HFCorpus("openwebtext", None, "text", {"train": "train[:-100000]", "validation": "train[-100000:]"}),
    "wikitext103": HFCorpus("wikitext", "wikitext-103-raw-v1", "text",
                            {"train": "train", "validation": "validation", "test": "test"}),
    "wikitext2": HFCorpus("wikitext", "wikitext-2-raw-v1", "text",
                          {"train": "train", "validation": "validation", "test": "test"}),
    "ptb": HFCorpus("ptb_text_only", None, "sentence", {"train": "train", "validation": "validation", "test": "test"}),
    "lm1b": HFCorpus("lm1b", None, "text", {"train": "train", "validation": "test", "test": "test"}),
    "lambada": HFCorpus("EleutherAI/lambada_openai", "default", "text", {"validation": "test", "test": "test"}),
}
TOKEN_SUFFIXES = (".npy", ".bin")
TEXT_SUFFIXES = (".txt", ".jsonl")


class TokenBlocks:
    """``n`` blocks of ``length`` tokens over a flat (memory-mapped) token stream.

    ``blocks[idx]`` with an int array idx [n] -> np.int64 [n, length].
    """

    def __init__(self, tokens: np.ndarray, length: int, name: str = ""):
        if length < 1:
            raise DataError(f"block length must be >= 1, got {length}")
        n = len(tokens) // length
        if n == 0:
            raise DataError(f"data source {name!r} holds {len(tokens)} tokens, fewer than one block of {length} "
                            f"(model.length): use more text or a smaller model.length")
        self.tokens, self.length, self.name = tokens, length, name
        self._blocks = tokens[: n * length].reshape(n, length)  # a view: nothing is read yet

    def __len__(self) -> int:
        return self._blocks.shape[0]

    def __getitem__(self, idx) -> np.ndarray:
        return np.asarray(self._blocks[idx], dtype=np.int64)

    @property
    def n_tokens(self) -> int:
        return self._blocks.size


def load_blocks(source: str, split: str, tokenizer, length: int, cache_dir: str | os.PathLike = "data",
                detokenize: bool = True, num_proc: int | None = None,
                detokenizer: Callable[[str], str] | None = None) -> TokenBlocks:
    """Blocks of ``length`` tokens from ``source`` (see the module doc); tokenises once and caches.

    ``detokenizer`` replaces a corpus's own detokenizer, and applies to local text sources too.

    Example::

        blocks = load_blocks("input.txt", "train", ByteTokenizer(), length=128, cache_dir="data")
        batch = blocks[np.array([0, 5])]   # [2, 128] int64
    """
    stream = load_token_stream(source, split, tokenizer, cache_dir, detokenize, num_proc, detokenizer)
    return TokenBlocks(stream, length, source)


def load_token_stream(source: str, split: str, tokenizer, cache_dir="data", detokenize: bool = True,
                      num_proc: int | None = None, detokenizer: Callable[[str], str] | None = None) -> np.ndarray:
    """The flat token stream (documents + EOS, concatenated) of a source, memory-mapped."""
    path = Path(source).expanduser()
    if path.suffix in TOKEN_SUFFIXES and path.is_file():
        return map_token_file(path, tokenizer)
    if path.exists():
        if not (path.is_dir() or path.suffix in TEXT_SUFFIXES):
            raise DataError(f"{path}: unsupported file type; expected {TEXT_SUFFIXES + TOKEN_SUFFIXES} or a folder "
                            f"of .txt files")
        detok = detokenizer if detokenize else None
        key = {"source": str(path.resolve()), "stamp": _file_stamp(path)}
        if detok is not None:  # keyed only when used, so the caches written before stay valid
            key["detok"] = detokenizer_identity(detok)
        return _cached(key, path.stem, split, tokenizer, cache_dir,
                       lambda: _tokenised(_detokenised(_local_documents(path), detok), tokenizer))
    if source not in HF_CORPORA:
        raise DataError(f"unknown dataset {source!r}: expected one of {sorted(HF_CORPORA)} or an existing path "
                        f"(.txt / .jsonl / folder of .txt / pre-tokenised .npy / .bin)")
    corpus = HF_CORPORA[source]
    if split not in corpus.splits:
        raise DataError(f"dataset {source!r} has no split {split!r}; expected one of {sorted(corpus.splits)}")
    detok = (detokenizer or DETOKENIZERS.get(source)) if detokenize else None
    key = {"source": source, "split": corpus.splits[split], "detok": detokenizer_identity(detok) if detok else None}
    return _cached(key, source, split, tokenizer, cache_dir,
                   lambda: _hf_tokenised(corpus, corpus.splits[split], tokenizer, detok, cache_dir, num_proc))


# ---- caching --------------------------------------------------------------------------------------
def cache_path(key: dict, stem: str, split: str, tokenizer, cache_dir) -> Path:
    """``<cache_dir>/<stem>-<split>-<digest>.<dtype>.bin``: a raw token stream, dtype in the name."""
    key = dict(key, tokenizer=tokenizer.identity, eos=tokenizer.eos_token_id, version=CACHE_VERSION)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    dtype = "uint16" if tokenizer.vocab_size <= 2**16 else "uint32"
    return Path(cache_dir) / f"{stem}-{split}-{digest}.{dtype}.bin"


def _cached(key, stem, split, tokenizer, cache_dir, pieces: Callable[[], Iterable[np.ndarray]]) -> np.ndarray:
    out = cache_path(key, stem, split, tokenizer, cache_dir)
    dtype = np.dtype(out.suffixes[-2][1:])
    if not out.exists():
        def write(fh):  # streamed: the corpus is never held in memory
            for piece in pieces():
                fh.write(piece.astype(dtype).tobytes())

        atomic_write(out, write, advice=CACHE_ADVICE)
    if out.stat().st_size == 0:
        raise DataError(f"data source {stem!r} ({split}) is empty: no documents (cached at {out})")
    return np.memmap(out, dtype=dtype, mode="r")


def _tokenised(documents: Iterable[str], tokenizer, chunk: int = 1024) -> Iterator[np.ndarray]:
    """Token arrays of chunks of documents, each document followed by EOS."""
    buf: list[str] = []
    for doc in documents:
        buf.append(doc)
        if len(buf) == chunk:
            yield _encode_chunk(buf, tokenizer)
            buf = []
    if buf:
        yield _encode_chunk(buf, tokenizer)


def _encode_chunk(texts: list[str], tokenizer) -> np.ndarray:
    eos = tokenizer.eos_token_id
    return np.fromiter((t for ids in tokenizer.encode_batch(texts) for t in (*ids, eos)), dtype=np.int64)


# ---- sources --------------------------------------------------------------------------------------
def _file_stamp(path: Path) -> list:
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def _local_documents(path: Path) -> Iterator[str]:
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise DataError(f"folder {path} holds no .txt files")
        for f in files:
            yield read_text(f)
    elif path.suffix == ".jsonl":
        yield from jsonl_documents(path)
    else:
        yield read_text(path)


def _detokenised(documents: Iterable[str], detok) -> Iterator[str]:
    return (detok(d) for d in documents) if detok is not None else iter(documents)


def _hf_tokenised(corpus: HFCorpus, split: str, tokenizer, detok, cache_dir, num_proc) -> Iterator[np.ndarray]:
    try:
        import datasets
    except ImportError as e:
        raise DataError("Hugging Face corpora need the `datasets` package: pip install 'radd-fast[data]'") from e
    if not hub_offline() and not hub_reachable():  # the hub client would spend its retries, then fail
        raise DataError(f"{corpus.path!r} ({corpus.name}, split {split!r}) is not tokenised in {cache_dir} yet and "
                        f"the Hugging Face hub cannot be reached (no network?): pass a local text file instead, "
                        f"or set HF_HUB_OFFLINE=1 to read a local Hugging Face cache")
    try:
        ds = datasets.load_dataset(corpus.path, corpus.name, split=split, cache_dir=str(Path(cache_dir) / "hf"))
    except Exception as e:  # the hub raises many types; name the corpus and re-raise
        raise DataError(f"could not load {corpus.path!r} ({corpus.name}, split {split!r}) from the hub: {e}") from e
    field = corpus.text_field

    def encode(batch):
        texts = [detok(t) for t in batch[field]] if detok else batch[field]
        return {"ids": [ids + [tokenizer.eos_token_id] for ids in tokenizer.encode_batch(texts)]}

    # One pass of `map` over worker processes (the published pipeline's way), then stream out in order.
    ds = ds.map(encode, batched=True, num_proc=num_proc, remove_columns=ds.column_names, desc=f"tokenising {corpus.path}")
    for batch in ds.with_format("numpy").iter(batch_size=1024):
        yield np.concatenate(batch["ids"]) if len(batch["ids"]) else np.zeros(0, np.int64)
