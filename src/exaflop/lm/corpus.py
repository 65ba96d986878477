"""Text sources for `exaflop data text`: documents as (name, text) pairs, in a stable order.

Every source yields documents sorted by name so the same inputs always give the
same shards. Problems that should not stop an import (undecodable bytes, binary
files, bad JSON lines) are counted in `CorpusStats` and reported in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from exaflop.errors import UserError

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst"}


@dataclass
class CorpusStats:
    documents: int = 0
    bytes: int = 0
    replaced_utf8: int = 0  # documents decoded with U+FFFD replacement
    skipped_binary: int = 0
    skipped_json: int = 0
    skipped_empty: int = 0
    warnings: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # name -> sha256 of the raw bytes


@dataclass
class Document:
    name: str
    text: str


def _decode(raw: bytes, stats: CorpusStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.replaced_utf8 += 1
        return raw.decode("utf-8", errors="replace")


def _looks_binary(raw: bytes) -> bool:
    # NUL bytes never occur in text files; a high share of control bytes means binary.
    head = raw[:4096]
    if b"\x00" in head:
        return True
    ctrl = sum(b < 9 or 13 < b < 32 for b in head)
    return len(head) > 0 and ctrl / len(head) > 0.1


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())


def iter_files(files: list[Path], root: Path, stats: CorpusStats) -> Iterator[Document]:
    for path in files:
        raw = path.read_bytes()
        name = str(path.relative_to(root))
        if not raw.strip():
            stats.skipped_empty += 1
            continue
        if _looks_binary(raw):
            stats.skipped_binary += 1
            continue
        stats.sources[name] = hashlib.sha256(raw).hexdigest()
        yield Document(name, _decode(raw, stats))


def iter_jsonl(path: Path, field_name: str, stats: CorpusStats) -> Iterator[Document]:
    raw_all = path.read_bytes()
    stats.sources[path.name] = hashlib.sha256(raw_all).hexdigest()
    for lineno, line in enumerate(_decode(raw_all, stats).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            stats.skipped_json += 1
            stats.warnings.append(f"{path}:{lineno}: not valid JSON, skipped")
            continue
        text = obj.get(field_name) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            stats.skipped_json += 1
            stats.warnings.append(f"{path}:{lineno}: no string field {field_name!r}, skipped")
            continue
        yield Document(f"{path.name}:{lineno}", text)


def iter_parquet(path: Path, column: str, stats: CorpusStats) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("Parquet input needs pyarrow: pip install 'exaflop[parquet]'") from None
    table = pq.read_table(path)
    if column not in table.column_names:
        raise UserError(f"{path}: no column {column!r} (columns: {', '.join(table.column_names)}); "
                        "pick one with --column")
    stats.sources[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    for i, text in enumerate(table.column(column).to_pylist()):
        if isinstance(text, str) and text.strip():
            yield Document(f"{path.name}:{i}", text)
        else:
            stats.skipped_empty += 1


def iter_documents(source: str, field_name: str = "text", max_bytes: int = 0,
                   stats: CorpusStats | None = None) -> Iterator[Document]:
    """Documents from `source`: "stdlib", a directory, a .jsonl file or a .parquet file."""
    stats = stats if stats is not None else CorpusStats()
    if source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        docs = iter_files(stdlib_files(), root, stats)
    else:
        path = Path(source)
        if not path.exists():
            raise UserError(f"data: source {source!r} does not exist (give a directory, .jsonl, .parquet, or 'stdlib')")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            others = [p for p in path.rglob("*") if p.is_file() and p.suffix not in TEXT_SUFFIXES]
            stats.skipped_binary += len(others)
            docs = iter_files(files, path, stats)
        elif path.suffix == ".jsonl":
            docs = iter_jsonl(path, field_name, stats)
        elif path.suffix == ".parquet":
            docs = iter_parquet(path, field_name, stats)
        else:
            raise UserError(f"data: {source}: unsupported file type {path.suffix!r} (use .jsonl, .parquet or a directory)")
    for doc in docs:
        stats.documents += 1
        stats.bytes += len(doc.text.encode("utf-8", errors="replace"))
        yield doc
        if max_bytes and stats.bytes >= max_bytes:
            break
