"""Chat SFT: the loss mask covers exactly the assistant's tokens; bad lines are counted; loss falls."""

from __future__ import annotations

import json

import numpy as np
import pytest

from exaflop.errors import UserError
from exaflop.lm.chat import render
from exaflop.lm.sft import (
    BUILTIN,
    build_splits,
    collate_sft,
    encode_conversation,
    load_conversations,
    stdlib_doc_conversations,
)
from exaflop.lm.tokenizer import load_tokenizer

from .conftest import lm_config

CONV = [{"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is json?"},
        {"role": "assistant", "content": "a data format; see `json.dumps`"},
        {"role": "user", "content": "and é?"},
        {"role": "assistant", "content": "an accented letter"}]


def test_mask_is_exactly_the_assistant_tokens(eco_data):
    tok = load_tokenizer(eco_data / "tokenizer.json")
    ids, mask = encode_conversation(tok, CONV)
    # Same tokens the server sees for this conversation (THE chat template, tokenized whole).
    assert ids.tolist() == tok.encode(render(CONV, add_generation_prompt=False), add_special_tokens=False).ids
    end = tok.token_to_id("<|end|>")
    # Masked-in tokens form one run per assistant turn: its content followed by <|end|>.
    runs, cur = [], []
    for i, m in zip(ids.tolist(), mask.tolist(), strict=True):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    assert [tok.decode(r[:-1], skip_special_tokens=False) for r in runs] == \
        [m["content"] for m in CONV if m["role"] == "assistant"]
    assert all(r[-1] == end for r in runs)
    # Nothing else: role headers, system/user turns and their <|end|> are out.
    outside = [i for i, m in zip(ids.tolist(), mask.tolist(), strict=True) if not m]
    assert tok.token_to_id("<|assistant|>") in outside and outside.count(end) == 3


def test_samples_pad_and_shift(eco_data, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"messages": CONV}) for _ in range(3)) + "\n")
    splits, _ = build_splits(str(path), eco_data / "tokenizer.json", seq_len=128)
    row = splits["train"][0]
    tok = load_tokenizer(eco_data / "tokenizer.json")
    ids, mask = encode_conversation(tok, CONV)
    n = len(ids)
    assert (row[0, :n] == ids).all() and (row[0, n:] == tok.token_to_id("<|pad|>")).all()
    assert (row[1, :n] == mask).all() and not row[1, n:].any()
    batch = collate_sft([row, row])
    assert batch["input"].shape == batch["target"].shape == batch["loss_mask"].shape == (2, 128)
    # loss_mask[t] weights predicting target[t] = token t+1.
    assert batch["loss_mask"][0].tolist() == mask[1:].tolist() + [False] * (129 - n)


def test_bad_lines_skipped_and_counted(tmp_path):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    lines = [json.dumps(good), "{not json", json.dumps({"messages": [{"role": "user", "content": "q"}]}),
             json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}),
             json.dumps({"messages": [{"role": "robot", "content": "q"}]}), json.dumps({"text": "x"}), ""]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines))
    convs, stats = load_conversations(str(path))
    assert len(convs) == 1 and stats.used == 1
    assert stats.skipped == {"without an assistant turn": 2, "not valid JSON": 1,
                             "with a malformed message": 1, "without a messages list": 1}
    assert "skipped 5" in stats.summary()
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text("\n".join(lines[1:]))
    with pytest.raises(UserError, match="no usable conversation.*2 without an assistant turn"):
        load_conversations(str(only_bad))


def test_builtin_demo_set_is_deterministic():
    convs, stats = load_conversations(BUILTIN)
    assert stats.used == len(convs) > 500 and convs[:40] == stdlib_doc_conversations(limit=40)
    assert all(m[-1]["role"] == "assistant" and len(m[-1]["content"]) >= 20 for m in convs)
    assert any("`json.dumps`" in m[-2]["content"] for m in convs)


def test_sft_loss_falls(eco_data, tmp_path):
    from exaflop.engine.trainer import train

    rng = np.random.default_rng(0)
    words = "fox dog python list dict value module".split()
    path = tmp_path / "qa.jsonl"
    with open(path, "w") as f:
        for _ in range(64):
            w = words[rng.integers(len(words))]
            msgs = [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w} {w}."}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    cfg = lm_config(tmp_path, eco_data, "sft", data={"sft_path": str(path)},
                    train={"steps": 30, "log_every": 1}, eval={"batches": 2})
    result = train(cfg, quiet=True)
    logs = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if r.get("kind") == "train"]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3])
    assert "val_bpb" not in result and result["val_loss"] < losses[0]


def test_truncated_conversations_keep_the_assistant_prefix_or_are_counted(eco_data, tmp_path):
    long_user = {"role": "user", "content": "word " * 200}
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(json.dumps({"messages": m}) for m in
                              [CONV, CONV, [long_user, CONV[2]]]) + "\n")
    splits, stats = build_splits(str(path), eco_data / "tokenizer.json", seq_len=64)
    assert sum(len(v) for v in splits.values()) == 2
    assert stats.skipped == {"whose assistant turn starts after model.seq_len tokens": 1}
