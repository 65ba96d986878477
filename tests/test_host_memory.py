"""engine/host_memory.py: freed host buffers are reused instead of being faulted in again, and
large tensors are backed by huge pages where asked.

Each case runs in a fresh interpreter: the setting is process-wide and once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

# Fill and free a 48 MB and a 12 MB tensor 20 times, as a training step's temporaries come and go;
# count the page faults of the last ten times (the first few settle the heap's layout).
_PROBE = r"""
import json, resource, sys
import torch
from exaflop.engine.host_memory import keep_freed_memory
state = keep_freed_memory() if sys.argv[1] == "1" else "not called"
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(20):
    if i == 10:
        before = faults()
    x = torch.empty(12 << 20).fill_(1.0)
    y = torch.empty(3 << 20).fill_(2.0)
    del x, y
print(json.dumps({"state": state, "again": keep_freed_memory() if state != "not called" else None,
                  "faults": faults() - before}))
"""


def _probe(call: bool, **env: str) -> dict:
    # Huge pages would fault a 48 MB block in 24 times, not 12,288: off here (the fault counts are 4 KB pages).
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("EXAFLOP_MALLOC",
                                                                                           "GLIBC_TUNABLES")}
    base["THP_MEM_ALLOC_ENABLE"] = "0"
    out = subprocess.run([sys.executable, "-c", _PROBE, "1" if call else "0"], env={**base, **env},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_buffers_are_reused_not_faulted_in_again():
    kept = _probe(True)
    assert kept["state"] == "kept" and kept["again"] == "kept"
    default = _probe(False)
    # 48 MB is 12,288 pages, above the 32 MB up to which glibc's threshold adapts: by default such
    # a block is mapped afresh each time (every page faults on the fill); kept, the heap's blocks
    # come back already backed.
    assert default["faults"] > 10 * 12000, default
    assert kept["faults"] < 500, kept


def test_the_users_choice_wins():
    assert _probe(True, EXAFLOP_MALLOC="default")["state"] == "off"
    user = _probe(True, MALLOC_ARENA_MAX="2")
    assert user["state"] == "user"
    assert user["faults"] > 10 * 12000  # left as glibc's default


# Allocate and touch a 64 MB tensor; report the process's memory in transparent huge pages.
_THP_PROBE = r"""
import json, sys
import torch
from exaflop.engine.host_memory import huge_page_share, huge_pages_for_large_tensors
state = huge_pages_for_large_tensors() if sys.argv[1] == "1" else "not called"
x = torch.ones(16 << 20)
huge = [int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages")][0]
print(json.dumps({"state": state, "huge_kb": huge, "sum": float(x.sum()), "share": huge_page_share([x]),
                  "meta": huge_page_share([torch.ones(4, device="meta")])}))
"""


def _thp_probe(call: bool, **env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", _THP_PROBE, "1" if call else "0"], env={**base, **env},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _thp_available() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def test_large_tensors_get_huge_pages_when_asked():
    on = _thp_probe(True)
    assert on["sum"] == 16 << 20
    if not _thp_available():
        assert on["state"] == "unsupported"
        pytest.skip("this kernel has transparent huge pages off")
    assert on["state"] == "on"
    assert on["huge_kb"] >= 32 << 10, on  # most of the 64 MB in 2 MB pages
    assert on["share"] == 1.0 and on["meta"] == 0.0, on  # and huge_page_share sees it (no CPU bytes: 0)
    user = _thp_probe(True, THP_MEM_ALLOC_ENABLE="0")  # the user's setting is left alone
    assert user["state"] == "user" and user["huge_kb"] < on["huge_kb"], user
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        always = "[always]" in f.read()
    if not always:  # where every large mapping gets huge pages anyway, the tensor has them too
        assert user["share"] == 0.0, user
