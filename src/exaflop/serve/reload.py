"""Loading served models, and hot reload when a run writes a newer checkpoint.

A `Weights` is one loaded checkpoint with its own KV cache. The reloader polls each
run's `checkpoints/` (`read_latest` only returns checkpoints whose every shard is
on disk at its recorded size, so a checkpoint still being written is never
picked up), loads a newer one in this thread, and hands it to the engine, which
swaps it in atomically for new requests. A load that fails is logged, counted in
/metrics, not retried until that checkpoint changes, and the old weights keep
serving.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from exaflop.engine.checkpoint import load_for_inference, read_latest
from exaflop.errors import UserError
from exaflop.lm.chat import ChatTemplate
from exaflop.lm.tokenizer import load_tokenizer, special_ids
from exaflop.nn.paged import PagedKVCache
from exaflop.serve.engine import Engine
from exaflop.serve.metrics import Metrics
from exaflop.serve.prefix import PrefixCache
from exaflop.serve.sequence import token_byte_table
from exaflop.serve.threads import in_fresh_thread

log = logging.getLogger("exaflop.serve")


class Weights:
    """One loaded language-model checkpoint, plus the KV cache its sequences decode in."""

    def __init__(self, cfg, model, tok, ckpt: Path, device: torch.device, template: ChatTemplate | None = None):
        self.cfg, self.model, self.tok, self.ckpt, self.device = cfg, model, tok, ckpt, device
        self.template = template or ChatTemplate()  # exaflop's, or an imported model's own (lm/chat.py)
        self.step = int(getattr(model, "checkpoint_step", 0))
        self.ctx = cfg.model.seq_len
        self.vocab_size = cfg.model.vocab_size
        # Any special token ends a reply: <|end|>, <|endoftext|>, a new role marker, and for
        # imported tokenizers their own end tokens (</s>, <|eot_id|>, ...).
        special = set(special_ids(tok).values()) | {
            i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        self.stop_ids = frozenset(special)
        self.eot_id = tok.token_to_id("<|endoftext|>")
        self._bytes = token_byte_table(tok, self.vocab_size, special)
        # No token covers more characters than its vocabulary string (byte-level BPE: one
        # string character per byte): text longer than ctx x this cannot fit the context,
        # which the API tells without tokenizing it (serve/api.py, _check_length).
        self.max_token_chars = max((len(t) for t in tok.get_vocab(with_added_tokens=True)), default=1)
        self.cache: PagedKVCache | None = None
        self.prefix: PrefixCache | None = None  # shared prompt blocks (serve/prefix.py); None: off
        self.prefix_bytes = 0  # the pool's room for them, set by the engine (Runner.prepare)
        self.kv_dtype: torch.dtype | None = None  # the cache's dtype (None: the weights'), set there too
        self.owners: list = []  # owners[slot] = the sequence in that slot; slots 0..len-1 are in use

    def token_bytes(self, token: int) -> bytes:
        return self._bytes[token] if 0 <= token < len(self._bytes) else b""

    def ensure_cache(self, slots: int) -> PagedKVCache:
        """The paged KV cache (nn/paged.py): every slot at full context, plus `prefix_bytes` of
        blocks kept for prefix caching. Allocated on first use: an idle reloaded model costs no
        cache memory."""
        if self.cache is None:
            cache = self._new_cache(slots)
            self.prefix = PrefixCache(cache) if self.prefix_bytes > 0 else None
            self.cache = cache
        return self.cache

    def stand_in_cache(self, slots: int) -> PagedKVCache:
        """A cache of the same sizes as `ensure_cache`'s, its pools never written (no memory
        beyond the pages a forward touches): what a decode step is compiled on while the real
        one serves. Same sizes, so the compiled graph's guards hold for the real cache."""
        return self._new_cache(slots, lazy=True)

    @property
    def cache_dtype(self) -> torch.dtype:
        """The KV cache's dtype: `--kv-dtype`, or the weights'."""
        return self.kv_dtype or self.model.tok_emb.weight.dtype

    def _new_cache(self, slots: int, lazy: bool = False) -> PagedKVCache:
        c, p = self.cfg.model, self.model.tok_emb.weight
        kv = self.cache_dtype
        extra = self.prefix_bytes // PagedKVCache.block_bytes(c.n_layer, c.n_kv_head, c.head_dim, kv)
        return PagedKVCache(c.n_layer, slots, c.n_kv_head, self.ctx, c.head_dim, extra_blocks=extra,
                            device=p.device, dtype=kv, lazy=lazy, compute_dtype=p.dtype)

    def take_slot(self, seq, slots: int) -> int:
        self.ensure_cache(slots)
        self.owners.append(seq)
        return len(self.owners) - 1

    def free_slot(self, slot: int) -> None:
        """Keep used slots packed at 0..n-1 by moving the last sequence into the hole.

        Packed slots let a (compiled) decode step take rows 0..n-1 without an index; a move
        moves one row's block table, not its keys. The freed slot's blocks are released.
        """
        self.cache.release(slot)
        last = len(self.owners) - 1
        if slot != last:
            mover = self.owners[last]
            self.cache.move_row(last, slot)
            self.owners[slot] = mover
            mover.slot = slot
        self.owners.pop()


def load_weights(ckpt: Path, run_dir: Path, device: torch.device, dtype: torch.dtype | None) -> Weights:
    cfg, task, model = load_for_inference(ckpt, device)
    if cfg.task != "lm":
        raise UserError(f"{run_dir}: a {cfg.task!r} run; only language models are served on /v1/*")
    if dtype is not None:
        model.to(dtype)
    tok = load_tokenizer(task.assets / "tokenizer.json")  # the run's own (lm/assets.py)
    return Weights(cfg, model, tok, ckpt, device, ChatTemplate.from_dir(task.assets))


@dataclass
class ServedModel:
    name: str
    path: Path  # run directory, or a fixed checkpoint directory (then never reloaded)
    engine: Engine
    watch: bool = True
    weights: Weights | None = None
    failed: set[tuple[str, float]] = field(default_factory=set)

    @property
    def run_dir(self) -> Path:
        return self.path if self.watch else self.path.parent.parent


def resolve_run(path_str: str) -> tuple[str, Path, bool]:
    """(model id, path, watch) for a RUN argument; raises UserError for anything unservable."""
    path = Path(path_str).resolve()
    if (path / "meta.json").is_file() and path.name.startswith("step_"):
        return path.parent.parent.name, path, False
    if not (path / "config.toml").is_file():
        raise UserError(f"{path_str}: not a run directory (no config.toml) nor a checkpoint "
                        "directory (step_*/meta.json); pass runs/<name>")
    ckpt, problems = read_latest(path / "checkpoints")
    if ckpt is None:
        raise UserError(f"{path_str}: no complete checkpoint yet" + (f" ({problems[0]})" if problems else ""))
    return path.name, path, True


class Reloader:
    """Background thread: initial load of every model, then polling for newer checkpoints."""

    def __init__(self, models: list[ServedModel], metrics: Metrics, device: torch.device,
                 dtype: torch.dtype | None = None, interval: float = 2.0, drives: list | None = None,
                 threads: int = 0):
        self.models, self.metrics, self.device, self.dtype = models, metrics, device, dtype
        self.threads = threads  # torch threads for loading and compiling (serve/threads.py)
        self.drives = drives or []  # serve.drive.DrivePredictor: poll() loads newer checkpoints
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reloader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            for m in self.models:
                try:
                    self.check(m)
                except Exception:  # never let one bad poll end hot reload for good
                    log.exception("%s: checking for a new checkpoint failed", m.name)
            for d in self.drives:
                try:
                    in_fresh_thread(d.poll, threads=self.threads)
                except Exception:
                    log.exception("%s: checking for a new checkpoint failed", d.name)
            if not self.interval:
                return
            self._stop.wait(self.interval)

    def _load(self, ckpt: Path, m: ServedModel) -> Weights:
        w = load_weights(ckpt, m.run_dir, self.device, self.dtype)
        m.engine.prepare(w)
        return w

    def check(self, m: ServedModel) -> None:
        if m.watch:
            ckpt, _ = read_latest(m.path / "checkpoints")
        else:
            ckpt = m.path if m.weights is None else None
        if ckpt is None or (m.weights is not None and _step_of(ckpt) <= m.weights.step):
            return
        try:
            key = (str(ckpt), (ckpt / "meta.json").stat().st_mtime)
        except OSError:  # pruned between listing and stat: try again next poll
            return
        if key in m.failed:
            return
        try:
            # Loading, packing and compiling run in a thread that ends with them: no OpenMP team
            # outlives them beside the engine's (serve/threads.py). A compiled step's kernels get
            # the thread count they are compiled with, so the same as the engine's.
            w = in_fresh_thread(self._load, ckpt, m, threads=self.threads)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: B036 — DCP's CheckpointException is a BaseException
            m.failed.add(key)
            self.metrics.reload_failures.inc(model=m.name)
            log.warning("%s: could not load %s (%s: %s); still serving %s", m.name, ckpt,
                        type(e).__name__, e, f"step {m.weights.step}" if m.weights else "nothing yet")
            return
        old = m.weights
        m.weights = w
        m.engine.swap(w)
        self.metrics.checkpoint_step.set(w.step, model=m.name)
        log.info("%s: serving %s (step %d)%s", m.name, ckpt.name, w.step,
                 f", was step {old.step}" if old else "")


def _step_of(ckpt: Path) -> int:
    try:
        return int(ckpt.name.split("_")[1])
    except (IndexError, ValueError):
        return -1
