"""Local data files, read with errors that say which file, where in it, and how to fix it.

Every problem is a ``DataError`` (one ``error:`` line from the CLIs) found before any
training or evaluation starts:
- text (``.txt``, a folder of them, ``.jsonl``) must be UTF-8: the first byte that is not
  names its byte offset (and line), with an ``iconv`` command that converts the file; a
  UTF-16 file and binary data (a NUL byte, even in valid UTF-8: no text holds one, and it is
  the byte tokenizer's end-of-text) are named as such;
- each non-blank ``.jsonl`` line must be one JSON object with a string ``text`` field:
  ``<file>:<line>:`` says which line and what it holds instead;
- a token file (``.bin``: raw uint16, the nanoGPT layout; ``.npy``: uint16 / uint32 /
  int32 / int64) must hold a whole number of ids, every id inside the tokenizer's
  vocabulary: the first one outside is named with its index and byte offset. The ids
  are scanned in chunks of the memory map (a 9B-token file is read once, never held).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import UserError

TOKEN_DTYPES = (np.uint16, np.uint32, np.int32, np.int64)
BIN_DTYPE = np.uint16  # .bin: raw ids, the nanoGPT layout
SCAN_CHUNK = 1 << 24  # ids per chunk when checking a token file's range (32-64 MiB read at a time)
NEWLINE = b"\n"
JSONL_EXAMPLE = '{"text": "..."}'


class DataError(UserError):
    """A data source is unknown, unreadable, malformed, or too small."""


# ---- text ---------------------------------------------------------------------------------------------
def read_text(path: Path) -> str:
    """The whole UTF-8 text of ``path`` (one document)."""
    return decode_text(path, _read_bytes(path), f"{path} is ", count_lines=True)


def decode_text(path: Path, data: bytes, prefix: str, base: int = 0, count_lines: bool = False) -> str:
    """``data`` (read from ``path`` at byte ``base``) as text; a ``DataError`` ``prefix + why``, with the fix,
    when it is UTF-16, holds a NUL byte (binary data; the byte tokenizer's EOS), or is not UTF-8."""
    out = path.with_name(f"{path.stem}.utf8{path.suffix}")
    if base == 0 and data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{prefix}UTF-16 text (it starts with a UTF-16 byte-order mark), not UTF-8: convert it "
                        f"with iconv -f utf-16 -t utf-8 {path} > {out}")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{prefix}binary data, not text (byte 0x00 at byte offset {base + nul}): pass UTF-8 text "
                        f"(.txt / .jsonl), or token ids as .npy or raw uint16 .bin")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = f", line {data.count(NEWLINE, 0, e.start) + 1}" if count_lines else ""
        raise DataError(f"{prefix}not UTF-8 (byte 0x{data[e.start]:02x} at byte offset {base + e.start}{line}): "
                        f"convert it with iconv -f <its encoding> -t utf-8, e.g. iconv -f cp1252 -t utf-8 {path} > "
                        f"{out} for Western-European text") from None


def jsonl_records(path: Path) -> Iterator[tuple[int, object]]:
    """``(line number, parsed JSON value)`` of each non-blank line of ``path``, streamed."""
    offset = 0  # byte offset of the line's start in the file
    try:
        with path.open("rb") as fh:
            for n, raw in enumerate(fh, 1):
                line = decode_text(path, raw, f"{path}:{n}: ", offset)
                if line.strip():
                    yield n, _parse_line(path, n, line)
                offset += len(raw)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def _parse_line(path: Path, n: int, line: str):
    try:  # without its newline, a cut string is "Unterminated", not "Invalid control character"
        return json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{n}: not valid JSON ({e.msg.removesuffix(' at')}, column {e.colno}): each line "
                        f"must be one JSON object such as {JSONL_EXAMPLE}") from None


def jsonl_documents(path: Path, field: str = "text") -> Iterator[str]:
    """The ``field`` string of each record of a JSONL file."""
    for n, record in jsonl_records(path):
        if not isinstance(record, dict):
            raise DataError(f"{path}:{n}: a JSON {json_kind(record)}, not an object: each line must be one JSON "
                            f"object such as {JSONL_EXAMPLE}")
        if field not in record:
            raise DataError(f"{path}:{n}: the object has no {field!r} field (its keys: {sorted(record)[:8]}): each "
                            f"line must be one JSON object such as {JSONL_EXAMPLE}")
        if not isinstance(record[field], str):
            raise DataError(f"{path}:{n}: {field!r} is a JSON {json_kind(record[field])}, not a string")
        yield record[field]


def json_kind(value) -> str:
    """JSON's name for the type of a parsed value."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)  # true / false / null
    return {int: "number", float: "number", str: "string", list: "array", dict: "object"}.get(type(value), "value")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


# ---- token files --------------------------------------------------------------------------------------
def map_token_file(path: Path, tokenizer) -> np.ndarray:
    """A flat token stream, memory-mapped, every id checked to be one of ``tokenizer``'s."""
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path} is empty (0 bytes): no token ids")
    if path.suffix == ".npy":
        try:
            tokens = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{path}: not a readable .npy array ({' '.join(str(e).split())}): truncated? write it "
                            f"again with numpy.save") from None
    else:
        itemsize = np.dtype(BIN_DTYPE).itemsize
        if size % itemsize:
            raise DataError(f"{path}: {size} bytes is not a whole number of token ids (a .bin file is raw uint16, "
                            f"{itemsize} bytes per id; the last byte, at offset {size - 1}, is left over): a "
                            f"truncated copy? copy or write it again, or save ids of another dtype as .npy")
        tokens = np.memmap(path, dtype=BIN_DTYPE, mode="r")
    if tokens.ndim != 1 or tokens.dtype not in TOKEN_DTYPES:
        raise DataError(f"{path}: expected a flat uint16/uint32/int32/int64 token stream, got {tokens.dtype} "
                        f"{tokens.shape}: save the ids as one flat array of one of those dtypes")
    check_ids(path, tokens, tokenizer)
    return tokens


def check_ids(path: Path, tokens: np.ndarray, tokenizer) -> None:
    """``DataError`` naming the first id of ``tokens`` outside ``[0, tokenizer.vocab_size)``."""
    vocab = tokenizer.vocab_size
    for start in range(0, len(tokens), SCAN_CHUNK):
        chunk = np.asarray(tokens[start:start + SCAN_CHUNK])
        if chunk.size and (int(chunk.max()) >= vocab or int(chunk.min()) < 0):
            i = start + int(np.argmax((chunk >= vocab) | (chunk < 0)))
            offset = getattr(tokens, "offset", 0) + i * tokens.dtype.itemsize
            raise DataError(f"{path}: token id {int(tokens[i])} (token {i}, byte offset {offset}) is outside "
                            f"the ids of tokenizer {tokenizer.name!r}, [0, {vocab}): tokenised with another tokenizer? "
                            f"pass that one (tokenizer= / --tokenizer)")
