"""Mutants that mutmut cannot map to tests, run anyway on a seeded sample.

mutmut picks the tests for each mutant by recording, in its own process, which tests
call the mutated function. Code that runs only inside a server the tests start as a
subprocess (serve/api.py, serve/drive.py) is never seen there, so mutmut reports its
mutants as "no tests" and skips them. This runs a seeded sample of them for real:
`MUTANT_UNDER_TEST=<name> pytest <tests>` inside mutmut's `mutants/` copy, where
tests/conftest.py points the servers' PYTHONPATH at the mutated code.

    mutmut run                      # makes mutants/ (config: pyproject [tool.mutmut])
    python tools/mutation_sample.py --module exaflop.serve.api --sample 20 \
        tests/serve/test_serve_openai.py tests/serve/test_serve_drive.py

Prints killed / survived per sampled mutant and the diff of each survivor.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


def mutant_names(mutants: Path, module: str) -> list[str]:
    src = (mutants / "src" / Path(*module.split("."))).with_suffix(".py").read_text()
    return [f"{module}.{m}" for m in re.findall(r"^\s*(?:async\s+)?def (x\S+__mutmut_\d+)\(", src, re.M)]


def with_status(mutants: Path, module: str, statuses: tuple[str, ...]) -> set[str] | None:
    """Mutants of `module` mutmut gave one of `statuses` (None when it has no results yet)."""
    done = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=mutants.parent,
                          capture_output=True, text=True)
    if done.returncode:
        return None
    out = set()
    for line in done.stdout.splitlines():
        name, _, status = line.strip().partition(": ")
        if name.startswith(module + ".") and status in statuses:
            out.add(name)
    return out


def run(mutants: Path, name: str, tests: list[str], timeout: float) -> tuple[str, float]:
    env = {**os.environ, "MUTANT_UNDER_TEST": name, "PYTHONPATH": str(mutants / "src")}
    t0 = time.perf_counter()
    # Its own process group: on a timeout the servers the tests started go with it.
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                            cwd=mutants, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        status = "survived" if proc.wait(timeout) == 0 else "killed"
    except subprocess.TimeoutExpired:
        status = "timeout (caught)"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return status, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("tests", nargs="+", help="test files or node ids, relative to the repository")
    ap.add_argument("--module", required=True, help="dotted module, e.g. exaflop.serve.api")
    ap.add_argument("--mutants", default="mutants", help="mutmut's copy of the repository")
    ap.add_argument("--sample", type=int, default=20)
    ap.add_argument("--pool", choices=["unmapped", "survived"], default="unmapped",
                    help="unmapped: mutants mutmut ran no test for; survived: rerun mutmut's survivors "
                    "with these tests (code that runs in DataLoader workers is unmapped per test too)")
    ap.add_argument("--only", default="", help="restrict to mutant names containing this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    mutants = Path(a.mutants).resolve()
    names = mutant_names(mutants, a.module)
    statuses = ("no tests", "not checked") if a.pool == "unmapped" else ("survived",)
    chosen = with_status(mutants, a.module, statuses)
    pool = sorted(n for n in (chosen if chosen is not None else names) if a.only in n)
    base, secs = run(mutants, "", a.tests, a.timeout)
    if base != "survived":
        sys.exit(f"the tests fail without any mutant ({base}); fix that first")
    pick = sorted(random.Random(a.seed).sample(pool, min(a.sample, len(pool))))
    print(f"{a.module}: {len(names)} mutants, {len(pool)} {a.pool}; sampling {len(pick)} "
          f"(seed {a.seed}); clean run {secs:.0f} s")
    results = {}
    for name in pick:
        status, secs = run(mutants, name, a.tests, a.timeout)
        results[name] = status
        print(f"  {status:16} {secs:5.0f} s  {name}", flush=True)
    survivors = [n for n, s in results.items() if s == "survived"]
    print(f"sampled {len(pick)}: {len(pick) - len(survivors)} killed, {len(survivors)} survived")
    for n in survivors:
        diff = subprocess.run([sys.executable, "-m", "mutmut", "show", n], cwd=mutants.parent,
                              capture_output=True, text=True).stdout
        print("\n".join(line for line in diff.splitlines() if line.startswith(("-", "+")) and
                        not line.startswith(("---", "+++"))))
    if a.json:
        Path(a.json).write_text(json.dumps({"module": a.module, "mutants": len(names), "unmapped": len(pool),
                                            "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
