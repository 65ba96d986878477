"""Files the planner writes: PNG plots and an exaflop training config for the chosen plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exaflop.config import dump_toml
from exaflop.errors import UserError
from exaflop.plan.catalog import ModelSpec


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works on headless CI and cluster login nodes
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    except OSError as e:
        raise UserError(f"--png {path}: cannot write ({e.strerror})") from None


def breakdown_png(plan: dict[str, Any], path: Path) -> None:
    """One horizontal stacked bar: where the chosen plan's step time goes."""
    plt = _pyplot()
    parts = [(k, v) for k, v in plan["step_breakdown_s"].items() if v > 0]
    fig, ax = plt.subplots(figsize=(9, 2.4))
    left = 0.0
    for name, seconds in parts:
        ax.barh([0], [seconds], left=left, label=f"{name} {seconds:.2f}s")
        left += seconds
    p = plan["plan"]
    ax.set_title(f"{plan['model']} on {plan['cluster']}: TP{p['tp']} PP{p['pp']} DP{p['dp']} CP{p['cp']} "
                 f"EP{p['ep']}, step {plan['step_s']:.2f} s, MFU {plan['run']['mfu'] * 100:.1f}%")
    ax.set_xlabel("seconds per optimizer step")
    ax.set_yticks([])
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=4, fontsize=8)
    _save(fig, path)
    plt.close(fig)


def scaling_png(points: list[dict[str, Any]], path: Path, title: str) -> None:
    """Time to train, MFU and goodput against accelerator count (log scale)."""
    plt = _pyplot()
    ns = [p["n"] for p in points]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    series = [("time to train (days)", [p["run"]["days"] for p in points], True),
              ("MFU (%)", [p["run"]["mfu"] * 100 for p in points], False),
              ("goodput (%)", [p["run"]["goodput"] * 100 for p in points], False)]
    for ax, (label, ys, logy) in zip(axes, series, strict=True):
        ax.plot(ns, ys, marker="o")
        ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("accelerators")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title)
    _save(fig, path)
    plt.close(fig)


def training_config(model: ModelSpec, plan: dict[str, Any]) -> str:
    """An exaflop training config (TOML) with the chosen plan's dims, loadable by load_config_file.

    The trainer's mesh is dp_replicate x dp_shard x tp; it has no pipeline, context or
    expert parallelism, so those ranks become FSDP shards (ZeRO-3) or extra replicas,
    and the planner's full plan is kept as comments (the config loader rejects unknown keys).
    """
    p = plan["plan"]
    folded = p["pp"] * p["cp"]
    if p["zero_stage"] >= 3:
        dp_replicate, dp_shard = 1, p["dp"] * folded
    else:
        dp_replicate, dp_shard = p["dp"], folded
    ac = {"none": "none", "selective": "selective", "full": "full"}[p["recompute"]]
    tree = {
        "task": "lm",
        "run": {"name": f"{model.name}-{plan['n']}x{plan['accelerator']}".replace("/", "-"),
                "dtype": "bf16"},
        "model": {"n_layer": model.layers, "d_model": model.hidden, "n_head": model.heads,
                  "n_kv_head": model.kv_heads, "d_ff": model.ffn, "vocab_size": model.vocab,
                  "seq_len": plan["seq_len"], "tie_embeddings": model.tie_embeddings,
                  "n_experts": model.experts, "top_k": model.top_k},
        "train": {"global_batch": plan["global_batch"], "micro_batch": p["micro_batch"],
                  "steps": plan["run"]["steps"]},
        "parallel": {"dp_replicate": dp_replicate, "dp_shard": dp_shard, "tp": p["tp"],
                     "activation_checkpoint": ac, "sequence_parallel": p["sequence_parallel"]},
    }
    header = [
        f"# written by `exaflop plan` for {plan['model']} on {plan['cluster']} ({plan['network']})",
        f"# planner's plan: tp={p['tp']} pp={p['pp']} dp={p['dp']} cp={p['cp']} ep={p['ep']} "
        f"vp={p['vp']} micro_batch={p['micro_batch']} recompute={p['recompute']} zero_stage={p['zero_stage']}",
        f"# predicted: step {plan['step_s']:.3f} s, MFU {plan['run']['mfu'] * 100:.1f}%, "
        f"{plan['run']['days']:.1f} days for {plan['inputs']['tokens']:.3g} tokens",
        "# exaflop train has no pipeline/context/expert parallelism: the pp x cp ranks are",
        "# folded into dp_shard (FSDP) below, so its memory and speed differ from the plan.",
    ]
    if model.mlp != "swiglu" or model.moe and (model.expert_ffn or model.shared_experts or model.dense_layers):
        header.append("# note: exaflop's model is SwiGLU with uniform experts; this model's MLP differs.")
    return "\n".join(header) + "\n" + dump_toml(tree)


def write_config(model: ModelSpec, plan: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.write_text(training_config(model, plan))
    except OSError as e:
        raise UserError(f"--emit {path}: cannot write ({e.strerror})") from None
