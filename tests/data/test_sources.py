"""Malformed local data (radd_fast/data/sources.py): every problem is one DataError naming the file and
the line (JSONL) or byte offset, with the fix; through ``load_blocks`` as the CLIs call it, before any
token is cached. Messages compared whole."""
from __future__ import annotations

import json

import numpy as np
import pytest

from radd_fast.data import ByteTokenizer, DataError, load_blocks, sources
from tests.support.messages import error_of

JSONL_FIX = 'each line must be one JSON object such as {"text": "..."}'


def blocks_error(path, tmp_path, tokenizer=None) -> str:
    message = error_of(load_blocks, str(path), "train", tokenizer or ByteTokenizer(), 4, tmp_path / "cache")
    cache = tmp_path / "cache"
    assert not cache.exists() or not list(cache.iterdir()), "a refused source left a cache or temporary file"
    return message


class TestText:
    def test_a_latin1_text_names_the_byte_its_offset_and_line_and_the_iconv_command(self, tmp_path):
        path = tmp_path / "notes.txt"
        path.write_bytes("first line\ncaf\xe9 au lait\n".encode("latin-1"))
        assert blocks_error(path, tmp_path) == (
            f"{path} is not UTF-8 (byte 0xe9 at byte offset 14, line 2): convert it with iconv -f <its encoding> "
            f"-t utf-8, e.g. iconv -f cp1252 -t utf-8 {path} > {tmp_path / 'notes.utf8.txt'} for Western-European text")

    def test_a_binary_file_is_named_binary_at_its_first_nul(self, tmp_path):
        path = tmp_path / "image.txt"
        path.write_bytes(b"PK\x03\x04\x00\x00\xff\xfe" * 8)
        assert blocks_error(path, tmp_path) == (
            f"{path} is binary data, not text (byte 0x00 at byte offset 4): pass UTF-8 text (.txt / .jsonl), "
            f"or token ids as .npy or raw uint16 .bin")

    def test_a_nul_byte_in_valid_utf8_is_binary_too(self, tmp_path):
        path = tmp_path / "program.txt"
        path.write_bytes(b"\x7fELF\x02\x01\x01\x00" * 8)  # ASCII bytes only: valid UTF-8
        assert blocks_error(path, tmp_path).startswith(f"{path} is binary data, not text (byte 0x00 at byte offset 7)")

    def test_a_utf16_file_is_named_utf16(self, tmp_path):
        path = tmp_path / "windows.txt"
        path.write_text("hello there", encoding="utf-16")
        assert blocks_error(path, tmp_path) == (
            f"{path} is UTF-16 text (it starts with a UTF-16 byte-order mark), not UTF-8: convert it with "
            f"iconv -f utf-16 -t utf-8 {path} > {tmp_path / 'windows.utf8.txt'}")

    def test_a_bad_file_in_a_folder_is_the_file_named(self, tmp_path):
        folder = tmp_path / "docs"
        folder.mkdir()
        (folder / "a.txt").write_text("fine text " * 4)
        (folder / "b.txt").write_bytes(b"ok \x80")
        assert blocks_error(folder, tmp_path).startswith(f"{folder / 'b.txt'} is not UTF-8 (byte 0x80 at byte "
                                                         f"offset 3, line 1): ")

    def test_an_unreadable_file_is_named(self, tmp_path, monkeypatch):
        path = tmp_path / "locked.txt"
        path.write_text("text")

        def denied(self):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(type(path), "read_bytes", denied)
        assert blocks_error(path, tmp_path) == f"cannot read {path}: Permission denied"


class TestJsonl:
    @pytest.mark.parametrize("line, problem", [
        ('{"text": "cut', "not valid JSON (Unterminated string starting, column 10): " + JSONL_FIX),
        ("not json", "not valid JSON (Expecting value, column 1): " + JSONL_FIX),
        ("42", "a JSON number, not an object: " + JSONL_FIX),
        ('["a", "b"]', "a JSON array, not an object: " + JSONL_FIX),
        ("null", "a JSON null, not an object: " + JSONL_FIX),
        ('{"body": "x", "id": 3}', "the object has no 'text' field (its keys: ['body', 'id']): " + JSONL_FIX),
        ('{"text": 7}', "'text' is a JSON number, not a string"),
    ])
    def test_a_bad_line_is_named_with_its_number(self, tmp_path, line, problem):
        path = tmp_path / "docs.jsonl"
        path.write_text(json.dumps({"text": "a good first document"}) + "\n\n" + line + "\n")
        assert blocks_error(path, tmp_path) == f"{path}:3: {problem}"

    def test_a_line_not_utf8_names_its_byte_offset_in_the_file(self, tmp_path):
        path = tmp_path / "docs.jsonl"
        path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
        assert blocks_error(path, tmp_path).startswith(f"{path}:2: not UTF-8 (byte 0xe9 at byte offset 30): "
                                                       f"convert it with iconv")

    def test_records_stream_with_their_line_numbers(self, tmp_path):
        path = tmp_path / "docs.jsonl"
        path.write_text('{"text": "a"}\n\n  \n{"text": "b", "n": 2}\n')
        assert list(sources.jsonl_records(path)) == [(1, {"text": "a"}), (4, {"text": "b", "n": 2})]


class TestTokenFiles:
    def test_a_bin_with_a_partial_id_names_the_left_over_byte(self, tmp_path):
        path = tmp_path / "train.bin"
        path.write_bytes(np.arange(10, dtype=np.uint16).tobytes() + b"\x01")
        assert blocks_error(path, tmp_path) == (
            f"{path}: 21 bytes is not a whole number of token ids (a .bin file is raw uint16, 2 bytes per id; "
            f"the last byte, at offset 20, is left over): a truncated copy? copy or write it again, or save ids "
            f"of another dtype as .npy")

    @pytest.mark.parametrize("suffix, offset", [(".bin", 2 * 37), (".npy", 128 + 2 * 37)])
    def test_an_id_outside_the_vocabulary_is_named_with_its_index_and_offset(self, tmp_path, suffix, offset):
        ids = np.arange(100, dtype=np.uint16) % 50
        ids[37], ids[80] = 300, 999
        path = tmp_path / f"train{suffix}"
        np.save(path, ids) if suffix == ".npy" else ids.tofile(path)
        assert blocks_error(path, tmp_path) == (
            f"{path}: token id 300 (token 37, byte offset {offset}) is outside the ids of tokenizer 'bytes', "
            f"[0, 256): tokenised with another tokenizer? pass that one (tokenizer= / --tokenizer)")

    def test_a_negative_id_is_outside_too(self, tmp_path):
        path = tmp_path / "train.npy"
        np.save(path, np.array([1, 2, -1, 3], dtype=np.int32))
        assert "token id -1 (token 2, byte offset 136) is outside" in blocks_error(path, tmp_path)

    def test_the_scan_goes_chunk_by_chunk(self, tmp_path, monkeypatch):
        monkeypatch.setattr(sources, "SCAN_CHUNK", 7)
        ids = np.zeros(50, dtype=np.uint16)
        ids[45] = 256
        path = tmp_path / "train.bin"
        ids.tofile(path)
        assert "token id 256 (token 45, byte offset 90)" in blocks_error(path, tmp_path)
        ids[45] = 255
        ids.tofile(path)
        assert len(load_blocks(str(path), "train", ByteTokenizer(), 5)) == 10

    def test_an_empty_or_unreadable_token_file(self, tmp_path):
        empty = tmp_path / "empty.bin"
        empty.write_bytes(b"")
        assert blocks_error(empty, tmp_path) == f"{empty} is empty (0 bytes): no token ids"
        cut = tmp_path / "cut.npy"
        np.save(cut, np.arange(100, dtype=np.uint16))
        cut.write_bytes(cut.read_bytes()[:150])
        assert blocks_error(cut, tmp_path).startswith(f"{cut}: not a readable .npy array (")
        assert blocks_error(cut, tmp_path).endswith("): truncated? write it again with numpy.save")

    def test_a_float_or_2d_array_is_named_with_its_dtype_and_shape(self, tmp_path):
        path = tmp_path / "train.npy"
        np.save(path, np.zeros((4, 3), dtype=np.float32))
        assert blocks_error(path, tmp_path) == (
            f"{path}: expected a flat uint16/uint32/int32/int64 token stream, got float32 (4, 3): save the ids as "
            f"one flat array of one of those dtypes")

    def test_data_error_is_one_class(self):
        assert sources.DataError is DataError
