"""The driving half of the main job: simulate, train drive-tiny, beat the baselines, render.

1. simulate highway-env episodes with the IDM/MOBIL expert and import them (<= 2 min)
2. train the `drive-tiny` preset on the training episodes (<= 3 min on 2 CPU cores)
3. evaluate on every clip of the held-out episodes beside the constant-velocity
   and hold-last-steering baselines: the model must beat both on ADE
4. render a PNG contact sheet of held-out clips with the trajectories drawn on
5. closed loop: the model drives the simulator on held-out seeds beside constant velocity,
   hold steering and the expert (collisions, progress, composite with 95% intervals)
"""

from __future__ import annotations

import time
from pathlib import Path

from exaflop.drive.importers.sim import SimOptions, run_sim_import
from exaflop.drive.shards import MANIFEST
from exaflop.progress import console

DEMO_EPISODES = 24  # ~55 s of simulation on 2 cores; 32 gave no better ADE than needed
DEMO_SECONDS = 30.0
DEMO_CLOSED_LOOP = (8, 15.0)  # held-out seeds x seconds: ~1 min on 2 cores


def run_demo(out_root: Path, data: Path = Path("data/drive-sim"), episodes: int | None = None,
             steps: int | None = None, quiet: bool = False,
             closed_loop: tuple[int, float] = DEMO_CLOSED_LOOP) -> dict:
    from exaflop.config import load_config
    from exaflop.drive.render import contact_sheet, evaluate_split, predict, print_table
    from exaflop.engine.checkpoint import load_for_inference
    from exaflop.engine.trainer import train

    times = {}
    t0 = time.perf_counter()
    episodes = episodes or DEMO_EPISODES
    if not (data / MANIFEST).is_file() or _episodes(data) != episodes:
        console.rule("[bold]1. exaflop data drive sim — highway-env episodes, IDM/MOBIL expert")
        run_sim_import(data, SimOptions(episodes=episodes, seconds=DEMO_SECONDS), quiet=quiet)
    manifest = _read(data)
    c = manifest["counts"]
    times["simulate_s"] = time.perf_counter() - t0
    console.print(f"clips: {c['clips_train']:,} train / {c['clips_val']:,} val from "
                  f"{len(manifest['splits']['train']['items'])} + {len(manifest['splits']['val']['items'])} "
                  f"episodes ({times['simulate_s']:.0f}s)")

    console.rule("[bold]2. exaflop train drive-tiny")
    t1 = time.perf_counter()
    overrides = [f"run.out_dir={out_root}", f"data.path={data}"] + ([f"train.steps={steps}"] if steps else [])
    result = train(load_config("drive-tiny", overrides), quiet=quiet)
    times["train_s"] = time.perf_counter() - t1

    console.rule("[bold]3. evaluate on the held-out episodes")
    t2 = time.perf_counter()
    run_dir = Path(result["run_dir"])
    cfg, task, model = load_for_inference(run_dir)
    val = task.build_dataset("val")
    res = evaluate_split(task, model, val, dtype=cfg.run.dtype)
    print_table(res)
    ids = [round(i * (len(val) - 1) / 7) for i in range(8)]
    png = run_dir / "render" / "contact_sheet.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    title = (f"drive-tiny on {res['clips']} held-out clips: ADE {res['val_ade']:.2f} m vs constant velocity "
             f"{res['val_cv_ade']:.2f} m, hold steering {res['val_hold_ade']:.2f} m")
    contact_sheet(predict(model, val, ids, dtype=cfg.run.dtype), val.view, png, 4, title)
    times["eval_s"] = time.perf_counter() - t2
    beats = res["val_ade"] < res["val_cv_ade"] and res["val_ade"] < res["val_hold_ade"]
    verdict = "[green]beats both baselines" if beats else "[red]does NOT beat both baselines"
    console.print(f"ADE {res['val_ade']:.3f} m vs constant velocity {res['val_cv_ade']:.3f} m and hold steering "
                  f"{res['val_hold_ade']:.3f} m: {verdict}")
    console.print(f"png: {png}")

    console.rule("[bold]4. closed loop: the model drives the simulator from its own frames")
    t3 = time.perf_counter()
    from exaflop.drive import closedloop

    n, seconds = closed_loop
    loop = closedloop.evaluate(run_dir, ["model", "constant-velocity", "hold-steering", "expert"], n, seconds,
                               seed=0, quiet=quiet)
    closedloop.save(loop, run_dir / "closed_loop")
    closedloop.print_table(loop)
    d = loop["model_vs"]["constant-velocity"]
    console.print(f"model - constant velocity, composite: {d['mean']:+.3f} (95% CI {d['ci95'][0]:+.3f} .. "
                  f"{d['ci95'][1]:+.3f}); png: {run_dir / 'closed_loop' / 'closed_loop.png'}")
    times["closed_loop_s"] = time.perf_counter() - t3
    console.print(f"driving part took {time.perf_counter() - t0:.0f}s (simulate {times['simulate_s']:.0f}s, "
                  f"train {times['train_s']:.0f}s, evaluate+render {times['eval_s']:.0f}s, "
                  f"closed loop {times['closed_loop_s']:.0f}s)")
    return {"beats_baselines": beats, "ade": res["val_ade"], "cv_ade": res["val_cv_ade"],
            "hold_ade": res["val_hold_ade"], "metrics": res, "png": str(png), "run_dir": str(run_dir),
            "closed_loop": {p: v["aggregate"] for p, v in loop["policies"].items()}, **times}


def _read(data: Path) -> dict:
    import json

    return json.loads((data / MANIFEST).read_text())


def _episodes(data: Path) -> int:
    m = _read(data)
    return int(m.get("provenance", {}).get("episodes", -1)) if m.get("status") == "complete" else -1
