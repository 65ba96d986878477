import json

import numpy as np
import pytest

from exaflop.errors import UserError
from exaflop.lm.shards import TokenWindows, build_text_dataset, read_manifest
from exaflop.lm.tokenizer import SPECIAL_TOKENS, load_tokenizer


def test_manifest_counts_and_checksums(data_dir):
    m = read_manifest(data_dir)
    assert m["dtype"] == "uint16" and m["vocab_size"] == 512
    assert m["documents"]["train"] > 0 and m["documents"]["val"] > 0
    for split in ("train", "val"):
        assert sum(s["tokens"] for s in m["shards"][split]) == m["tokens"][split]
        for s in m["shards"][split]:
            assert (data_dir / s["file"]).stat().st_size == 2 * s["tokens"]
    assert len(m["sources"]) == m["documents"]["train"] + m["documents"]["val"]
    tok = load_tokenizer(data_dir / "tokenizer.json")
    assert all(tok.token_to_id(t) is not None for t in SPECIAL_TOKENS)


def test_shards_are_deterministic(corpus_dir, tmp_path):
    a = build_text_dataset(str(corpus_dir), tmp_path / "a", vocab_size=400, quiet=True)
    b = build_text_dataset(str(corpus_dir), tmp_path / "b", vocab_size=400, quiet=True)
    assert a["tokenizer_sha"] == b["tokenizer_sha"]
    for split in ("train", "val"):
        for sa, sb in zip(a["shards"][split], b["shards"][split], strict=True):
            assert (tmp_path / "a" / sa["file"]).read_bytes() == (tmp_path / "b" / sb["file"]).read_bytes()


def test_tokenizer_round_trip_non_ascii_and_invalid_utf8(tmp_path, data_dir):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_text("naïve café 日本語 🚀 ünïcode\n" * 50, encoding="utf-8")
    (src / "bad.txt").write_bytes(b"valid start \xff\xfe broken \xc3 bytes end\n" * 50)
    m = build_text_dataset(str(src), tmp_path / "out", vocab_size=300, quiet=True)
    assert m["stats"]["replaced_utf8"] == 1
    tok = load_tokenizer(tmp_path / "out" / "tokenizer.json")
    for text in ("naïve café 日本語 🚀", "tabs\tand\nnewlines  ", "valid start \ufffd\ufffd broken"):
        assert tok.decode(tok.encode(text).ids) == text


def test_binary_files_are_skipped_and_counted(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"t{i}.txt").write_text(f"document {i} " * 200)
    (src / "blob.txt").write_bytes(bytes(range(256)) * 20)
    (src / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    m = build_text_dataset(str(src), tmp_path / "out", vocab_size=300, quiet=True)
    assert m["stats"]["skipped_binary"] == 2 and m["documents"]["train"] + m["documents"]["val"] == 3


def test_jsonl_bad_lines_are_counted_with_line_numbers(tmp_path):
    f = tmp_path / "c.jsonl"
    lines = [json.dumps({"body": f"line {i} " * 50}) for i in range(6)]
    lines.insert(2, "{not json")
    lines.insert(4, json.dumps({"other": 1}))
    f.write_text("\n".join(lines) + "\n")
    m = build_text_dataset(str(f), tmp_path / "out", vocab_size=300, field_name="body", quiet=True)
    assert m["stats"]["skipped_json"] == 2
    assert any("c.jsonl:3" in w for w in m["warnings"])


def test_parquet_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    f = tmp_path / "c.parquet"
    pq.write_table(pa.table({"content": [f"row {i} text " * 40 for i in range(8)]}), f)
    m = build_text_dataset(str(f), tmp_path / "out", vocab_size=300, field_name="content", quiet=True)
    assert m["documents"]["train"] + m["documents"]["val"] == 8
    with pytest.raises(UserError, match="no column 'text'"):
        build_text_dataset(str(f), tmp_path / "o2", vocab_size=300, quiet=True)


def test_stdlib_default_source(tmp_path):
    m = build_text_dataset("stdlib", tmp_path / "std", vocab_size=300, max_bytes=300_000, quiet=True)
    assert m["source"] == "stdlib" and m["tokens"]["train"] > 10_000


@pytest.mark.parametrize("setup, needle", [
    ("missing", "does not exist"),
    ("empty", "no usable text"),
    ("vocab", "too small"),
])
def test_bad_corpus_inputs(tmp_path, setup, needle):
    src = tmp_path / "src"
    vocab = 300
    if setup == "empty":
        src.mkdir()
    elif setup == "vocab":
        src.mkdir()
        (src / "a.txt").write_text("x " * 100)
        (src / "b.txt").write_text("y " * 100)
        vocab = 100
    with pytest.raises(UserError, match=needle):
        build_text_dataset(str(src), tmp_path / "out", vocab_size=vocab, quiet=True)
    assert not (tmp_path / "out").exists()


def test_token_windows_random_access(data_dir):
    w = TokenWindows(data_dir, "train", 64)
    raw = np.fromfile(data_dir / read_manifest(data_dir)["shards"]["train"][0]["file"], dtype=np.uint16)
    assert len(w) == (raw.size - 1) // 64
    assert np.array_equal(w[3], raw[192:257])
