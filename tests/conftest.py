"""Fixtures for the foundation tests: a small real corpus, tokenized once per session."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The MFU denominator's matmul sweep, per training run started (engine/runtime.py): shorter here.
os.environ.setdefault("EXAFLOP_PEAK_SECONDS", "0.15")
# `auto` precision's trial (engine/precision.py) remembered for this test session only, shared by
# both xdist workers and every process they start: each model shape is measured once (~1-2 s of
# CPU per training run otherwise), and nothing a user's own cache holds leaks in.
_session = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
os.environ.setdefault("EXAFLOP_PRECISION_CACHE", os.path.join(tempfile.gettempdir(), f"exaflop-tests-{_session}",
                                                              "precision.json"))
warnings.filterwarnings("ignore", message="torch.distributed is disabled")
# Tests that call torch.compile themselves get what the trainer and server set up: inductor's cache
# kept per CPU instruction set, or a run capped to AVX2 loads AVX-512 code compiled by a native run
# and gets NaN gradients (engine/precision.py compile_cache_per_isa).
from exaflop.engine.precision import compile_cache_per_isa  # noqa: E402

compile_cache_per_isa()

REPO = Path(__file__).resolve().parents[1]
# Under `make mutation` the suite runs inside mutmut's mutants/ copy of the repository and the
# mutant is chosen by an environment variable: servers and torchrun workers that tests start
# must import that copy too, not the installed package, or their mutants could never be caught.
if REPO.name == "mutants" and (REPO / "src" / "exaflop").is_dir():
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))

TINY_MODEL = ["model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.n_kv_head=2",
              "model.vocab_size=512", "model.seq_len=64"]


# The files that take longest (seconds summed over their tests in a CI run, `--durations=0`),
# heaviest first. `make test` hands whole files to two xdist workers in collection order
# (--dist loadfile --no-loadscope-reorder), each taking the next file when it runs dry: starting
# with the long ones, the short ones fill in at the end and both workers finish together, instead
# of one running a two-minute file alone while the other idles (1.5-2 min of a CI run).
HEAVY_FIRST = ["test_smoke.py", "drive/test_train_e2e.py", "dist/test_pipeline.py", "dist/test_dist.py",
               "test_readme.py", "dist/test_moe_dist.py", "drive/test_fleet.py", "test_portable_run.py",
               "test_cli.py", "drive/test_closed_loop.py", "test_engine.py", "dist/test_elastic.py",
               "serve/test_serve_drive.py", "test_precision.py"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}

    def key(item: pytest.Item) -> int:
        try:
            rel = item.path.relative_to(REPO / "tests").as_posix()
        except ValueError:
            return len(rank)
        return rank.get(rel, len(rank))

    items.sort(key=key)  # stable: each file keeps its own order


def write_text_corpus(root: Path) -> Path:
    """A few hundred KB of real text: the standard library's own docs of some modules."""
    import importlib

    root.mkdir(parents=True, exist_ok=True)
    for name in ("json", "argparse", "collections", "pathlib", "textwrap", "functools", "string",
                 "random", "heapq", "bisect", "shutil", "tempfile"):
        mod = importlib.import_module(name)
        (root / f"{name}.py").write_text(Path(mod.__file__).read_text(encoding="utf-8"), encoding="utf-8")
    (root / "unicode.md").write_text("# Ünïcödé — naïve café, 日本語のテキスト, emoji 🚀\n" * 20,
                                     encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return write_text_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, corpus_dir) -> Path:
    from exaflop.lm.shards import build_text_dataset

    out = tmp_path_factory.mktemp("data") / "text"
    build_text_dataset(str(corpus_dir), out, vocab_size=512, val_fraction=0.1, quiet=True)
    return out


def tiny_overrides(tmp: Path, data: Path, name: str, *extra: str) -> list[str]:
    return [f"data.path={data}", f"run.out_dir={tmp / 'runs'}", f"run.name={name}", "run.dtype=fp32",
            "run.tensorboard=false", "run.threads=1", "train.global_batch=8", "train.micro_batch=4",
            "train.log_every=1", "eval.batches=2", "optim.warmup_steps=2", *TINY_MODEL, *extra]
