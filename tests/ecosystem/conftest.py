"""Shared fixtures: a tiny tokenized corpus and a tiny trained fp32 run (built once per session)."""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # everything here must load from local directories
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message="torch.distributed is disabled")

WORDS = ("the quick brown fox jumps over a lazy dog while python modules return values "
         "from lists and dicts").split()


def write_corpus(root: Path, docs: int = 12) -> Path:
    """Repetitive text (a few fixed sentences in shuffled order) so a tiny model gets confident fast."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(9)) + "." for _ in range(6)]
    for d in range(docs):
        lines = [rng.choice(sentences) for _ in range(80)]
        (root / f"doc{d:02d}.txt").write_text("\n".join(lines) + "\n")
    return root


def lm_config(tmp: Path, data_dir: Path, name: str, **sections):
    from exaflop.config import Config

    tree = {
        "task": "lm",
        "run": {"name": name, "out_dir": str(tmp / "runs"), "dtype": "fp32", "tensorboard": False,
                "seed": 0},
        "model": {"n_layer": 2, "d_model": 64, "n_head": 4, "n_kv_head": 2, "vocab_size": 320,
                  "seq_len": 64, "tie_embeddings": True},
        "data": {"path": str(data_dir)},
        "train": {"steps": 40, "global_batch": 8, "micro_batch": 8, "log_every": 5},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.0},
        "eval": {"batches": 1},
    }
    for section, values in sections.items():
        tree[section] = {**tree.get(section, {}), **values} if isinstance(values, dict) else values
    return Config.model_validate(tree)


@pytest.fixture(scope="session")
def eco_data(tmp_path_factory) -> Path:
    """A data dir (tokenizer.json with exaflop's special tokens, shards, manifest), vocab 300."""
    from exaflop.lm.shards import build_text_dataset

    tmp = tmp_path_factory.mktemp("eco")
    corpus = write_corpus(tmp / "corpus")
    build_text_dataset(str(corpus), tmp / "data", vocab_size=300, quiet=True)
    return tmp / "data"


def random_run(tmp: Path, data: Path, name: str, init_std: float = 0.25, **model) -> Path:
    """A run holding a random model as a step-0 checkpoint (no training: fast).

    A large init_std makes the logits peaked, so greedy decoding has clear winners and
    comparisons with other runtimes are not decided by rounding noise.
    """
    import torch

    from exaflop.lm.hf_import import write_run
    from exaflop.lm.model import LM

    cfg = lm_config(tmp, data, name, model={"init_std": init_std, **model})
    torch.manual_seed(0)
    return write_run(cfg, LM(cfg.model), "test", force=False)


@pytest.fixture(scope="session")
def tiny_run(eco_data, tmp_path_factory) -> Path:
    """2 layers, GQA (4 query / 2 kv heads), tied embeddings, vocab 320 > the tokenizer's 300."""
    return random_run(tmp_path_factory.mktemp("run"), eco_data, "tiny")


def pytest_collection_modifyitems(config, items):
    # DCP warns on every single-process save/load; the CLI silences it the same way.
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.filterwarnings("ignore:torch.distributed is disabled"))
