"""Host memory: keep freed CPU buffers in the process instead of handing them back to the OS
(`keep_freed_memory`, training), back large tensors with huge pages
(`huge_pages_for_large_tensors`, serving) and tell whether given tensors got them
(`huge_page_share`: the fp32 decode step streams its weights differently when they did).

A training step on CPU allocates and frees the same large temporaries every step (a chunk's
logits, attention scores, the compiled graph's activations: 1-32 MB each for lm-small). glibc
maps large blocks afresh (`mmap` above a threshold that starts at 128 KB and adapts only up to
32 MB) and gives them back on free (`munmap`, or by trimming the heap's top), so every step
page-faults and zero-fills those buffers again. Kept, lm-small (AMX, 2 threads) trained compiled
1.05-1.20x faster (paired median 1.18x) and eager ~3% faster, with the same peak RSS
(docs/benchmarks.md). This is the allocator tuning PyTorch's CPU performance guides reach with
jemalloc / tcmalloc preloads; glibc's own `mallopt` does it without a dependency or a restart.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Iterable

import torch

# mallopt parameters (glibc <malloc.h>).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Blocks up to this size come from the heap and are reused; larger ones (a model's weights being
# loaded, say) are still mapped and unmapped on their own. mallopt takes an int.
_KEEP_BELOW = (1 << 31) - 1

_state: str | None = None
_THP_SYSFS = "/sys/kernel/mm/transparent_hugepage/enabled"


def keep_freed_memory() -> str:
    """Make glibc reuse freed blocks instead of unmapping them (once per process). Returns what
    was done: 'kept', or why not ('off' by EXAFLOP_MALLOC=default, 'user' where the user chose an
    allocator or glibc malloc settings, 'unsupported' off glibc / Linux)."""
    global _state
    if _state is not None:
        return _state
    _state = _apply()
    return _state


def _apply() -> str:
    if os.environ.get("EXAFLOP_MALLOC", "") == "default":
        return "off"
    # The user's own choice wins: a preloaded allocator (jemalloc, tcmalloc) or glibc settings.
    if "malloc" in os.environ.get("LD_PRELOAD", "") or any(
            k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ):
        return "user"
    if not sys.platform.startswith("linux"):
        return "unsupported"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl ignores these parameters)
    except (OSError, AttributeError):
        return "unsupported"
    # Without a trim threshold glibc would also give the heap's freed top back after each step.
    ok = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(_KEEP_BELOW)) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(_KEEP_BELOW)) == 1 and ok
    return "kept" if ok else "unsupported"


def huge_pages_for_large_tensors() -> str:
    """Back PyTorch's large CPU tensors (>= 2 MB: weights, KV cache pools) with transparent huge
    pages, through PyTorch's own switch (THP_MEM_ALLOC_ENABLE: 2 MB-aligned, `madvise`d blocks).
    Effective for tensors allocated afterwards only, and only before the process's first tensor of
    2 MB or more (PyTorch reads the switch once): call it first. Returns 'on', 'user' (the user set
    THP_MEM_ALLOC_ENABLE: left as it is) or 'unsupported' (no transparent huge pages here).

    Why: a decode step reads every weight once, and a model's 176-352 MB in 4 KB pages is 45-90
    thousand TLB misses a step. Served, `lm-124m` on 2 cores (docs/benchmarks.md): fp32 capped to
    AVX2 3.4% more tokens/s at 8 streams, even at 32; bf16 on AMX +2-3% at 1 and 8 streams."""
    if "THP_MEM_ALLOC_ENABLE" in os.environ:
        return "user"
    try:
        with open(_THP_SYSFS) as f:
            modes = f.read()
    except OSError:
        return "unsupported"
    if "[never]" in modes:
        return "unsupported"
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    return "on"


def huge_page_share(tensors: Iterable[torch.Tensor]) -> float:
    """The share of the tensors' bytes (CPU ones; 0 for others) that lies in mappings backed
    mostly (at least half) by transparent huge pages, from /proc/self/smaps: 0.0 where that cannot
    be read. Reads the whole table: call it once per model, not per step."""
    spans = [(t.data_ptr(), t.untyped_storage().nbytes()) for t in tensors if t.device.type == "cpu"]
    total = sum(n for _, n in spans)
    if not total:
        return 0.0
    try:
        with open("/proc/self/smaps") as f:
            text = f.read()
    except OSError:
        return 0.0
    mostly_huge: list[tuple[int, int]] = []  # [start, end) of mappings at least half in huge pages
    start = end = size = 0
    for line in text.splitlines():
        head = line.split(None, 1)[0]
        if "-" in head and not head.endswith(":"):  # a mapping's first line: "start-end perms ..."
            a, b = head.split("-")
            start, end = int(a, 16), int(b, 16)
        elif head == "Size:":
            size = int(line.split()[1])
        elif head == "AnonHugePages:" and size and int(line.split()[1]) * 2 >= size:
            mostly_huge.append((start, end))
    covered = sum(n for p, n in spans if any(a <= p < b for a, b in mostly_huge))
    return covered / total
