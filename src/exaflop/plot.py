"""`exaflop plot RUN`: train/val loss and throughput against steps, as a PNG."""

from __future__ import annotations

from pathlib import Path

from exaflop.engine.telemetry import read_metrics
from exaflop.errors import UserError


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    if not train:
        raise UserError(f"{run_dir}: no training metrics in metrics.jsonl yet; train first")
    out = Path(out) if out else run_dir / "plots" / "loss.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    val_key = next((k for k in ("val_loss", "val_ade") if evals and k in evals[0]), None)
    if val_key:
        ax1.plot([r["step"] for r in evals], [r[val_key] for r in evals], "o-", label=val_key.replace("_", " "))
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.set_title(run_dir.name)
    ax1.legend()
    ax1.grid(alpha=0.3)
    rate_key = "tokens_per_s" if train[-1].get("tokens_per_s") else "samples_per_s"
    ax2.plot([r["step"] for r in train], [r[rate_key] for r in train], color="tab:green")
    ax2.set_xlabel("step")
    ax2.set_ylabel(rate_key.replace("_per_s", "/s"))
    ax2.set_title("throughput")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
