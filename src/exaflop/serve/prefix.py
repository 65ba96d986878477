"""Automatic prefix caching: full KV blocks of earlier requests, shared by later ones.

The server's KV cache is paged (nn/paged.py): every row's keys and values are in refcounted
blocks of `BLOCK` positions. This index names full blocks by their tokens and the block
before them — a chain, `(parent block id, tokens)` as the dictionary key, so a match is
exact, never a hash collision — and keeps them after their sequence ends. Before a prefill,
the longest chain of indexed blocks that starts the new prompt is attached to the sequence's
row: block ids written into its block table, refcounts raised, no keys copied. Then the
indexed block that continues that chain with the longest run of the prompt's next tokens (a
prompt rarely ends on a block boundary: a repeated short prompt, a system prompt's last
partial block) lends those positions: its block is copied into one of the row's own (~1 MB
for lm-124m in fp32, against recomputing up to 15 tokens). Only the rest of the prompt is
computed (at least one token: its logits start the reply). After a prefill
the prompt's full blocks are indexed; when a sequence finishes, its prompt and output (all
but the last sampled token, whose keys were never computed) are.

Shared blocks are full and rows write only past their own length, so a shared block is never
written. An indexed block no row references stays in the pool until the pool runs out of
free blocks; then the least recently used leaf (a block no indexed block extends) is reused
first, so every indexed chain stays reachable from its start. The pool holds every row at
full length plus `--prefix-cache-mb` of such blocks, so a row never waits for memory.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from exaflop.nn.paged import BLOCK, PagedKVCache

__all__ = ["BLOCK", "PrefixCache"]


@dataclass
class _Entry:
    block: int
    parent: int  # the parent's block id; -1: the first block
    key: tuple
    children: int = 0

    @property
    def start(self) -> tuple[int, int]:
        """(parent, first token): where a prompt's next tokens look for a block to copy from."""
        return self.parent, self.key[1][0]


class PrefixCache:
    def __init__(self, cache: PagedKVCache):
        self.cache, self.block = cache, cache.block
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()  # LRU order: oldest first
        self.by_block: dict[int, _Entry] = {}
        self.starts: dict[tuple[int, int], dict[tuple, _Entry]] = {}  # by (parent, first token)
        self.hits = self.lookups = 0  # blocks reused / blocks asked for (metrics, tests)
        self.copied = 0  # tokens restored from copied blocks (tests)
        cache.retain = self.by_block.__contains__
        cache.evict = self._evict

    def _chain(self, ids: list[int], limit: int) -> list[_Entry]:
        """The indexed blocks that start `ids` (at most `limit` tokens' worth)."""
        chain, parent = [], -1
        for j in range(limit // self.block):
            e = self.entries.get((parent, tuple(ids[j * self.block:(j + 1) * self.block])))
            if e is None:
                break
            chain.append(e)
            parent = e.block
        return chain

    def _tail(self, parent: int, rest: list[int]) -> tuple[_Entry | None, int]:
        """The indexed block after `parent` whose tokens start with the longest run of `rest`."""
        best, n = None, 0
        for e in self.starts.get((parent, rest[0]), {}).values() if rest else ():
            pairs = enumerate(zip(e.key[1], rest, strict=False))  # the shorter of block and rest
            m = next((i for i, (a, b) in pairs if a != b), min(len(rest), self.block))
            if m > n:
                best, n = e, m
        return best, n

    def attach(self, row: int, ids: list[int]) -> int:
        """Start row `row` with the longest indexed prefix of `ids` (leaving >= 1 token to compute):
        full blocks shared, then a block's first positions copied; returns the tokens it covers."""
        limit = len(ids) - 1
        chain = self._chain(ids, limit)
        self.lookups += limit // self.block
        self.hits += len(chain)
        for e in chain:
            self.entries.move_to_end(e.key)  # recently used (a chain's start stays older than its end)
        covered = len(chain) * self.block
        tail, n = self._tail(chain[-1].block if chain else -1, ids[covered:limit])
        if tail is not None:
            self.entries.move_to_end(tail.key)
            self.copied += n
        self.cache.attach(row, [e.block for e in chain], (tail.block, n) if tail is not None else None)
        return covered + n

    def register(self, row: int, ids: list[int]) -> None:
        """Index the full blocks of `ids`, whose keys and values row `row` holds."""
        cache = self.cache
        full = min(len(ids), int(cache.lengths[row])) // self.block
        own = cache.owned[row]
        parent = -1
        for j in range(min(full, len(own))):
            key = (parent, tuple(ids[j * self.block:(j + 1) * self.block]))
            e = self.entries.get(key)
            if e is None:
                b = own[j]
                if b in self.by_block:  # indexed under another chain (cannot happen: blocks are full)
                    return
                e = _Entry(b, parent, key)
                self.entries[key] = self.by_block[b] = e
                self.starts.setdefault(e.start, {})[key] = e
                if parent >= 0:
                    self.by_block[parent].children += 1
            else:
                # Computed twice (two rows prefilled the same prompt at once): the first copy is
                # indexed; this row's own block is freed when the row ends.
                self.entries.move_to_end(key)
            parent = e.block

    def _evict(self) -> int | None:
        """Unindex the least recently used leaf no row references; its block id, or None."""
        refs = self.cache.refs
        victim = next((e for e in self.entries.values() if e.children == 0 and refs[e.block] == 0), None)
        if victim is None:
            return None
        del self.entries[victim.key], self.by_block[victim.block]
        siblings = self.starts[victim.start]
        del siblings[victim.key]
        if not siblings:
            del self.starts[victim.start]
        if victim.parent >= 0:
            self.by_block[victim.parent].children -= 1
        return victim.block

    @property
    def cached_blocks(self) -> int:
        """Indexed blocks no row references (what the prefix budget holds)."""
        return sum(1 for e in self.entries.values() if self.cache.refs[e.block] == 0)
