"""`exaflop data text`: corpus -> tokenizer -> packed token shards + manifest.

Layout of an output directory:
    tokenizer.json
    train_000000.bin ...   packed token ids, documents separated by <|endoftext|>
    val_000000.bin ...
    manifest.json          counts, dtype, tokenizer hash, shard and source checksums
The split is by document (a hash of its name), so no document straddles train and
val. Same inputs -> byte-identical shards (sorted sources, no randomness).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from exaflop.errors import UserError
from exaflop.lm.corpus import CorpusStats, Document, iter_documents
from exaflop.lm.tokenizer import end_of_text_id, load_tokenizer, tokenizer_hash, train_tokenizer
from exaflop.progress import progress_bar

MANIFEST_VERSION = 1


def is_val(name: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    return (h % 10_000) < val_fraction * 10_000


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


def _write_split(tok, eot: int, docs: list[Document], split: str, out: Path, dtype: np.dtype,
                 shard_tokens: int, bar, task) -> list[dict]:
    shards: list[dict] = []
    buf: list[np.ndarray] = []
    n_buf = 0

    def flush() -> None:
        nonlocal buf, n_buf
        if not n_buf:
            return
        arr = np.concatenate(buf).astype(dtype)
        name = f"{split}_{len(shards):06d}.bin"
        arr.tofile(out / name)
        shards.append({"file": name, "tokens": int(arr.size),
                       "sha256": hashlib.sha256(arr.tobytes()).hexdigest()})
        buf, n_buf = [], 0

    chunk = 256
    for i in range(0, len(docs), chunk):
        batch = docs[i:i + chunk]
        # encode_batch runs on the tokenizers library's thread pool (parallel, order-preserving).
        for enc in tok.encode_batch([d.text for d in batch], add_special_tokens=False):
            ids = np.asarray(enc.ids + [eot], dtype=np.int64)
            buf.append(ids)
            n_buf += ids.size
            if n_buf >= shard_tokens:
                flush()
        bar.update(task, advance=sum(len(d.text) for d in batch))
    flush()
    return shards


def build_text_dataset(source: str, out_dir: str | Path, vocab_size: int = 4096,
                       tokenizer_path: str | None = None, field_name: str = "text",
                       val_fraction: float = 0.02, shard_tokens: int = 50_000_000,
                       max_bytes: int = 0, quiet: bool = False) -> dict:
    out_dir = Path(out_dir)
    stats = CorpusStats()
    docs = list(iter_documents(source, field_name, max_bytes, stats))
    if not docs:
        raise UserError(f"data: source {source!r} has no usable text documents "
                        f"({stats.skipped_binary} binary, {stats.skipped_empty} empty, "
                        f"{stats.skipped_json} bad JSON lines skipped)")
    train_docs = [d for d in docs if not is_val(d.name, val_fraction)]
    val_docs = [d for d in docs if is_val(d.name, val_fraction)]
    if not val_docs:  # tiny corpora: still hold out one document so eval is honest
        val_docs, train_docs = train_docs[-1:], train_docs[:-1]
    if not train_docs:
        raise UserError(f"data: source {source!r} has only {len(docs)} document(s); "
                        "need at least 2 (one is held out for validation)")

    if tokenizer_path:
        tok = load_tokenizer(tokenizer_path)
        eot = end_of_text_id(tok, tokenizer_path)
    else:
        tok = train_tokenizer((d.text for d in train_docs), vocab_size)
        eot = end_of_text_id(tok, "")
    vocab = tok.get_vocab_size()
    dtype = token_dtype(vocab)

    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out_dir.parent if out_dir.parent.exists() else None))
    try:
        total_chars = sum(len(d.text) for d in docs)
        with progress_bar(quiet) as bar:
            task = bar.add_task("tokenizing", total=total_chars)
            train = _write_split(tok, eot, train_docs, "train", tmp, dtype, shard_tokens, bar, task)
            val = _write_split(tok, eot, val_docs, "val", tmp, dtype, shard_tokens, bar, task)
        tok.save(str(tmp / "tokenizer.json"))
        manifest = {
            "version": MANIFEST_VERSION,
            "source": source,
            "vocab_size": vocab,
            "dtype": dtype.name,
            "tokenizer_sha": tokenizer_hash(tok),
            "eot_id": eot,
            "val_fraction": val_fraction,
            "documents": {"train": len(train_docs), "val": len(val_docs)},
            "tokens": {"train": sum(s["tokens"] for s in train), "val": sum(s["tokens"] for s in val)},
            "bytes": {"train": sum(len(d.text.encode("utf-8", "replace")) for d in train_docs),
                      "val": sum(len(d.text.encode("utf-8", "replace")) for d in val_docs)},
            "shards": {"train": train, "val": val},
            "stats": {k: v for k, v in asdict(stats).items() if k not in ("sources", "warnings")},
            "warnings": stats.warnings[:100],
            "sources": stats.sources,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise UserError(f"data.path: {data_dir} has no manifest.json; build it with "
                        f"`exaflop data text --out {data_dir}`")
    return json.loads(path.read_text())


class TokenWindows:
    """Random access to fixed windows of seq_len+1 tokens over a split's shards.

    Sample i is the i-th non-overlapping window; windows never cross shard files.
    Shards are memory-mapped lazily, so the object pickles cheaply into DataLoader workers.
    """

    def __init__(self, data_dir: str | Path, split: str, seq_len: int):
        self.dir = Path(data_dir)
        m = read_manifest(self.dir)
        self.dtype, self.seq_len = np.dtype(m["dtype"]), seq_len
        self.shards = m["shards"][split]
        counts = [max(0, (s["tokens"] - 1) // seq_len) for s in self.shards]
        self.offsets = np.cumsum([0] + counts)
        self._maps: dict[int, np.ndarray] = {}
        if self.offsets[-1] == 0:
            total = sum(s["tokens"] for s in self.shards)
            raise UserError(f"data: {split} split of {data_dir} has {total} tokens, fewer than one "
                            f"window of seq_len+1={seq_len + 1}; use a bigger corpus or a smaller model.seq_len")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}

    def __getitem__(self, i: int) -> np.ndarray:
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        if s not in self._maps:
            self._maps[s] = np.memmap(self.dir / self.shards[s]["file"], dtype=self.dtype, mode="r")
        start = (i - int(self.offsets[s])) * self.seq_len
        return np.asarray(self._maps[s][start:start + self.seq_len + 1], dtype=np.int64)
