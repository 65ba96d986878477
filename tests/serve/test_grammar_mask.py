"""The token mask of serve/grammar.py against llguidance's own verdict, token by token, on the
test model's real tokenizer and weights. It runs on every CPU path: on AVX2-only CPUs the
torch.compile'd llguidance kernel this replaced let forbidden tokens through."""

from __future__ import annotations

import json

import torch

from exaflop.serve.grammar import Constraint, mask_rows
from exaflop.serve.reload import load_weights


def test_mask_allows_exactly_what_the_grammar_allows(run_dir):
    ckpt = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    w = load_weights(ckpt, run_dir, torch.device("cpu"), None)
    schema = {"type": "object", "properties": {"a": {"enum": ["xy", "z"]}}, "required": ["a"]}
    from llguidance import LLMatcher

    grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema))
    rows = [Constraint(w, grammar), None, Constraint(w, grammar)]
    rows[2].consume(w.tok.encode('{"', add_special_tokens=False).ids[0])
    logits = torch.zeros(3, w.vocab_size)
    mask_rows(logits, rows)
    assert torch.isfinite(logits[1]).all()  # an unconstrained row keeps every token
    for r in (0, 2):
        allowed = torch.isfinite(logits[r]).nonzero().flatten().tolist()
        assert allowed and len(allowed) < w.vocab_size
        for t in range(w.vocab_size):  # llguidance's own check, one token at a time
            ok = rows[r].matcher.deep_copy().consume_token(t)
            assert ok == (t in allowed), (r, t)
