"""See it: held-out clips with ground-truth and predicted trajectories drawn over the frames.

Waypoints live in the ego frame (x forward, y left, metres); the dataset's
`view` says how that maps to pixels: a top-down view (simulator) is a scale and
an ego position, a dashcam is a pinhole camera at a height above a flat road.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from exaflop.drive import metrics as M
from exaflop.drive.video import write_video

COLORS = {"truth": (40, 220, 60), "model": (255, 40, 200), "cv": (150, 150, 150), "hold": (255, 200, 0)}
LABELS = {"truth": "ground truth", "model": "model", "cv": "constant velocity", "hold": "hold steering"}


def project(points: np.ndarray, view: dict, width: int, height: int) -> np.ndarray:
    """(K, 2) ego-frame metres -> (M, 2) pixel (u, v); points behind a dashcam are dropped."""
    pts = np.concatenate([np.zeros((1, 2)), points])  # start the line at the ego
    if view.get("type") == "bev":
        ppm = width / view["metres_per_width"]
        eu, ev = view["ego"][0] * width, view["ego"][1] * height
        return np.stack([eu + pts[:, 0] * ppm, ev - pts[:, 1] * ppm], axis=-1)
    f = (width / 2) / math.tan(math.radians(view.get("hfov_deg", 60.0)) / 2)
    pts = pts[pts[:, 0] > 1.0]
    u = width / 2 - f * pts[:, 1] / pts[:, 0]
    v = height * view.get("horizon", 0.5) + f * view.get("cam_height_m", 1.3) / pts[:, 0]
    return np.stack([u, v], axis=-1)


def draw_polyline(img: np.ndarray, uv: np.ndarray, color: tuple[int, int, int], radius: int = 1) -> None:
    """Paint a thick polyline in place by stamping small squares along each segment."""
    h, w = img.shape[:2]
    for (u0, v0), (u1, v1) in zip(uv[:-1], uv[1:], strict=False):
        n = int(max(abs(u1 - u0), abs(v1 - v0))) + 1
        for s in np.linspace(0.0, 1.0, n + 1):
            u, v = int(round(u0 + s * (u1 - u0))), int(round(v0 + s * (v1 - v0)))
            if -radius <= u < w + radius and -radius <= v < h + radius:
                img[max(v - radius, 0):v + radius + 1, max(u - radius, 0):u + radius + 1] = color


def predict(model, source, ids: list[int], device: str = "cpu", dtype: str = "auto") -> dict[str, np.ndarray]:
    """Frames, ground truth, model and baseline trajectories for the given clips."""
    from exaflop.drive.source import collate
    from exaflop.engine.precision import autocast_for

    samples = [source[i] for i in ids]
    batch = {k: v.to(device) for k, v in collate(samples).items()}
    k = batch["waypoints"].shape[1]
    with torch.no_grad(), autocast_for(dtype, device):
        wp, _ = model(batch["video"], batch["speed"], batch["steering"])
    base = M.baselines(batch, k)
    return {"frames": np.stack([s["video"] for s in samples]).transpose(0, 1, 3, 4, 2),  # (N, T, H, W, C)
            "truth": batch["waypoints"].cpu().numpy(), "model": wp.float().cpu().numpy(),
            "cv": base["cv"][0].cpu().numpy(), "hold": base["hold"][0].cpu().numpy()}


def overlay(frame: np.ndarray, trajs: dict[str, np.ndarray], view: dict, scale: int) -> np.ndarray:
    img = frame.repeat(scale, 0).repeat(scale, 1).copy()
    h, w = img.shape[:2]
    for name in ("cv", "hold", "truth", "model"):  # truth (wide) under the model (narrow)
        radius = max(1, scale // 2) + (1 if name == "truth" else 0) - (1 if name == "model" else 0)
        draw_polyline(img, project(trajs[name], view, w, h), COLORS[name], radius=max(radius, 0))
    return img


def render_clips(pred: dict[str, np.ndarray], view: dict, fps: float, out_dir: Path,
                 scale: int = 4, title: str = "") -> dict[str, Path]:
    """MP4: each clip plays, then holds its last frame with the trajectories; PNG contact sheet."""
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(pred["frames"])
    video_frames = []
    for i in range(n):
        for frame in pred["frames"][i][:-1]:
            video_frames.append(frame.repeat(scale, 0).repeat(scale, 1))
        last = overlay(pred["frames"][i][-1], {k: pred[k][i] for k in COLORS}, view, scale)
        video_frames += [last] * int(fps)
    mp4 = out_dir / "clips.mp4"
    write_video(mp4, video_frames, fps)
    png = out_dir / "contact_sheet.png"
    contact_sheet(pred, view, png, scale, title)
    return {"mp4": mp4, "png": png}


def contact_sheet(pred: dict[str, np.ndarray], view: dict, path: Path, scale: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(pred["frames"])
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows + 0.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        ax = axes.flat[i]
        img = overlay(pred["frames"][i][-1], {k: pred[k][i] for k in COLORS}, view, scale)
        ax.imshow(img)
        ade = np.linalg.norm(pred["model"][i] - pred["truth"][i], axis=-1).mean()
        cv = np.linalg.norm(pred["cv"][i] - pred["truth"][i], axis=-1).mean()
        ax.set_title(f"ADE {ade:.2f} m (cv {cv:.2f})", fontsize=8)
    handles = [plt.Line2D([], [], color=np.array(COLORS[k]) / 255, lw=3, label=LABELS[k]) for k in COLORS]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_split(task, model, source, batch_size: int = 64, limit: int = 0,
                   dtype: str = "auto") -> dict[str, float]:
    """Model and baselines over a whole split (or its first `limit` clips), in the precision
    `dtype` resolves to on this machine (the run's own run.dtype, by the callers)."""
    from exaflop.drive.source import collate
    from exaflop.engine.precision import autocast_for

    n = len(source) if not limit else min(limit, len(source))
    batches = (collate([source[i] for i in range(s, min(s + batch_size, n))]) for s in range(0, n, batch_size))
    with autocast_for(dtype, next(model.parameters()).device):
        out = task.evaluate(model, list(batches))
    out["clips"] = n
    return out


def render_run(run_dir: str | Path, out_dir: Path | None = None, clips: int = 8, split: str = "val",
               png_only: bool = False, data: str | None = None) -> dict:
    """`exaflop drive render RUN`: MP4 + PNG of held-out clips and a metrics summary."""
    from exaflop.engine.checkpoint import load_for_inference

    cfg, task, model = load_for_inference(run_dir)
    task.use_data(data or cfg.data.path, "drive render")
    source = task.build_dataset(split) if split != "train" else _plain_train(task)
    out_dir = Path(out_dir) if out_dir else Path(run_dir) / "render"
    ids = np.linspace(0, len(source) - 1, num=min(clips, len(source))).round().astype(int).tolist()
    pred = predict(model, source, ids, dtype=cfg.run.dtype)
    summary = evaluate_split(task, model, source, dtype=cfg.run.dtype)
    title = (f"{Path(run_dir).name}, {split} ({summary['clips']} clips): ADE model {summary['val_ade']:.2f} m, "
             f"constant velocity {summary['val_cv_ade']:.2f} m, hold steering {summary['val_hold_ade']:.2f} m")
    fps = float(task.manifest["clip"]["fps"])
    if png_only:
        out_dir.mkdir(parents=True, exist_ok=True)
        files = {"png": out_dir / "contact_sheet.png"}
        contact_sheet(pred, source.view, files["png"], 4, title)
    else:
        files = render_clips(pred, source.view, fps, out_dir, title=title)
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=1))
    return {"files": {k: str(v) for k, v in files.items()}, "metrics": summary, "title": title}


def _plain_train(task):
    from exaflop.drive.source import ClipSource

    return ClipSource(task.dcfg.path, "train", storage_options=task.dcfg.storage_options)


def print_table(res: dict) -> None:
    """Rows: metrics; columns: model and the two baselines."""
    from rich.table import Table

    from exaflop.progress import console

    table = Table(title=f"{int(res.get('clips', 0))} held-out clips (lower is better)")
    for col in ("metric", "model", "constant velocity", "hold steering"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    names = [k.removeprefix("val_") for k in res if k.startswith("val_") and not k.startswith(("val_cv_", "val_hold_"))
             and k != "val_ade_vs_best_baseline"]
    for n in names:
        cells = [res.get(f"val_{p}{n}") for p in ("", "cv_", "hold_")]
        table.add_row(n, *("-" if c is None else f"{c:.3f}" for c in cells))
    console.print(table)
