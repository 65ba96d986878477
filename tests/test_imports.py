"""The package's import graph: every module imports in a fresh interpreter, no module imports
itself back through others (module-level or inside functions), and the layers of
docs/architecture.md hold."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "exaflop"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(module_name(p) for p in PKG.rglob("*.py"))


def imports_of(path: Path, known: set[str]) -> set[str]:
    """exaflop modules `path` imports anywhere in its body (TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(path.read_text())
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):  # annotations only: never imported at run time
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("exaflop")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            if not base.startswith("exaflop"):
                continue
            for a in node.names:  # `from exaflop.lm import config` imports a module
                sub = f"{base}.{a.name}"
                out.add(sub if sub in known else base)
    out.discard(me)
    return {m for m in out if m in known}


def graph() -> dict[str, set[str]]:
    known = set(MODULES)
    return {module_name(p): imports_of(p, known) for p in PKG.rglob("*.py")}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if n.startswith(m + ".") or m.startswith(n + "."):
                continue  # a package and its own modules (`__init__` re-exports)
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Which package may import which (docs/architecture.md). `tasks` is the registry: the one
# module that knows every task; the engine reaches tasks only through it.
ALLOWED = {
    "exaflop.nn": {"exaflop.nn", "exaflop.errors"},
    "exaflop.data": {"exaflop.data", "exaflop.errors", "exaflop.progress"},
    "exaflop.plan": {"exaflop.plan", "exaflop.errors", "exaflop.config", "exaflop.schema", "exaflop.progress",
                     "exaflop.tasks", "exaflop.lm.config", "exaflop.drive.config"},
    "exaflop.engine": {"exaflop.engine", "exaflop.data", "exaflop.nn", "exaflop.config", "exaflop.errors",
                       "exaflop.progress", "exaflop.schema", "exaflop.tasks", "exaflop.plot"},
}


def test_layers():
    bad = []
    for mod, deps in graph().items():
        for layer, allowed in ALLOWED.items():
            if mod == layer or mod.startswith(layer + "."):
                bad += [f"{mod} imports {d}" for d in deps
                        if not any(d == a or d.startswith(a + ".") for a in allowed)]
    assert not bad, "\n".join(bad)


def test_every_module_imports_in_a_fresh_interpreter():
    mods = [m for m in MODULES if not m.endswith("__main__")]  # those run the CLI
    code = ("import importlib, sys\n"
            f"for m in {mods!r}:\n"
            "    importlib.import_module(m)\n"
            "print(len(sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_training_and_serving_start_without_the_compiler():
    """A training or serving process that does not compile never imports torch._dynamo (~0.5 s
    of its start): the functions a compiled step treats as constants are marked by
    nn.kernels.trace_constant, which must mark them exactly as torch's own decorator does."""
    import torch

    from exaflop.nn.kernels import trace_constant

    def ours() -> bool:
        return True

    def torchs() -> bool:
        return True

    assert trace_constant(ours) is ours
    assert vars(ours) == vars(torch.compiler.assume_constant_result(torchs)) != {}
    code = ("import sys\n"
            "import exaflop.cli, exaflop.engine.trainer, exaflop.lm.task, exaflop.drive.task, exaflop.serve.api\n"
            "print([m for m in sys.modules if m.startswith('torch._dynamo')][:3])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]", done.stdout
