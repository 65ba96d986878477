"""The unigram baseline: what a model that ignores context scores on the val split."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from exaflop.lm.shards import read_manifest


def unigram_cross_entropy(data_dir: str | Path) -> dict[str, float]:
    """Cross-entropy (nats/token) of val tokens under train unigram frequencies (add-one smoothed).

    Also returns the train unigram entropy; the val cross-entropy is the fair bar
    since the model is scored on val too.
    """
    data_dir = Path(data_dir)
    m = read_manifest(data_dir)
    vocab, dtype = m["vocab_size"], np.dtype(m["dtype"])
    counts = np.ones(vocab, dtype=np.float64)
    for s in m["shards"]["train"]:
        counts += np.bincount(np.fromfile(data_dir / s["file"], dtype=dtype), minlength=vocab)[:vocab]
    p = counts / counts.sum()
    entropy = float(-(p * np.log(p)).sum())
    val = np.concatenate([np.fromfile(data_dir / s["file"], dtype=dtype) for s in m["shards"]["val"]])
    ce = float(-np.log(p[val.astype(np.int64)]).mean())
    bytes_per_token = m["bytes"]["val"] / max(1, m["tokens"]["val"])
    return {"unigram_entropy": entropy, "unigram_val_loss": ce,
            "unigram_val_bpb": ce / math.log(2) / bytes_per_token}
