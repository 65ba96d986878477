"""Automatic prefix caching: keys and values of prompt blocks, kept and reused across requests.

Token sequences are cut into blocks of `block` tokens. A block is identified by its tokens
and the block before it (a chain: `(parent id, tokens)` as the dictionary key, so equality is
exact, never a hash collision), and holds every layer's keys and values for those positions.
After a prefill, the prompt's full blocks are stored; when a sequence finishes, its prompt and
output (all but the last sampled token, whose keys were never computed) are. Before a prefill,
the longest chain of stored blocks that starts the new prompt is copied into the sequence's
cache row, and only the rest of the prompt is computed: the next turn of a conversation, or
many requests sharing a system prompt, skip most of their prefill. At least one prompt token
is always computed (its logits start the reply).

Memory is bounded (`--prefix-cache-mb`): least recently used blocks are evicted first, leaves
before the blocks they extend (a block whose child is still stored is never evicted first,
so every stored chain stays reachable). Copies in and out of the dense per-slot cache
(nn/decode.py) cost a memcpy per block instead of paged attention's zero copies; what they
save is the block's share of the prefill's matmuls and attention.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

BLOCK = 16  # tokens per block: small enough that a shared prefix is rarely cut short


@dataclass
class _Block:
    id: int
    parent: int  # -1: the first block
    k: list[torch.Tensor]  # per layer (K, block, D)
    v: list[torch.Tensor]
    children: int = 0
    nbytes: int = 0
    key: tuple = field(default=())


class PrefixCache:
    def __init__(self, budget_bytes: int, block: int = BLOCK):
        self.budget, self.block = budget_bytes, block
        self.blocks: OrderedDict[tuple, _Block] = OrderedDict()  # LRU order: oldest first
        self.by_id: dict[int, _Block] = {}
        self.bytes = 0
        self._next = 0
        self.hits = self.lookups = 0  # blocks reused / blocks asked for (metrics, tests)

    def _chain(self, ids: list[int], limit: int) -> list[tuple]:
        """Keys of the stored blocks that start `ids` (at most `limit` tokens' worth)."""
        keys, parent = [], -1
        for j in range(limit // self.block):
            key = (parent, tuple(ids[j * self.block:(j + 1) * self.block]))
            blk = self.blocks.get(key)
            if blk is None:
                break
            keys.append(key)
            parent = blk.id
        return keys

    def restore(self, cache, slot: int, ids: list[int]) -> int:
        """Copy the longest stored prefix of `ids` (leaving >= 1 token) into row `slot`; returns
        the number of tokens restored (a multiple of the block size)."""
        want = (len(ids) - 1) // self.block
        keys = self._chain(ids, len(ids) - 1)
        self.lookups += want
        self.hits += len(keys)
        if not keys:
            return 0
        for j, key in enumerate(keys):
            blk = self.blocks[key]
            self.blocks.move_to_end(key)  # recently used
            cache.write_block(slot, j * self.block, blk.k, blk.v)
        n = len(keys) * self.block
        cache.lengths[slot] = n
        return n

    def store(self, cache, slot: int, ids: list[int]) -> None:
        """Keep the full blocks of `ids`, whose keys/values are in row `slot` (those not kept yet)."""
        if self.budget <= 0:
            return
        full = min(len(ids), int(cache.lengths[slot])) // self.block
        parent = -1
        for j in range(full):
            key = (parent, tuple(ids[j * self.block:(j + 1) * self.block]))
            blk = self.blocks.get(key)
            if blk is None:
                k, v = cache.read_block(slot, j * self.block, self.block)
                nbytes = sum(t.numel() * t.element_size() for t in (*k, *v))
                if nbytes > self.budget:
                    return
                blk = _Block(self._next, parent, k, v, nbytes=nbytes, key=key)
                self._next += 1
                self.blocks[key] = self.by_id[blk.id] = blk
                self.bytes += nbytes
                if parent >= 0:
                    self.by_id[parent].children += 1
            else:
                self.blocks.move_to_end(key)
            parent = blk.id
        self._evict()

    def _evict(self) -> None:
        while self.bytes > self.budget and self.blocks:
            # The least recently used leaf (no stored block extends it).
            victim = next((b for b in self.blocks.values() if b.children == 0), None)
            if victim is None:
                return
            del self.blocks[victim.key], self.by_id[victim.id]
            self.bytes -= victim.nbytes
            if victim.parent >= 0:
                self.by_id[victim.parent].children -= 1
