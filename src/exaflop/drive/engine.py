"""The data engine: the model drives, its failures become training data, a gate decides
what is served ("real-time learning").

`exaflop drive engine RUN --rounds R`. One round:

1. **Drive with a shadow.** The promoted checkpoint drives M seeded episodes (engine seeds:
   2 * 10**9 + ..., disjoint from the recordings and from the evaluation seeds). At every
   step the IDM/MOBIL expert's action for the current state is computed — not applied —
   (a shadow: a copy of the expert put in the ego's place for one `act()`).
2. **Triggers** select moments: `collision` (the 2 s before a crash), `ttc` (time to
   collision under 1 s, and the second before), `disagreement` (model and shadow differ by
   more than 0.05 rad of steering or 2.5 m/s^2 of acceleration), `off_road` (the 2 s before
   leaving the road), `comfort` (steps outside nuPlan's acceleration bounds).
3. **Relabel (DAgger).** Each selected state the model actually visited is re-created by
   replaying the episode (it is deterministic given the seed and the model's commands), and
   the expert is rolled out from it for the label horizon: its path becomes the waypoints,
   its steering the future steering, of a clip made of the frames the model saw there.
4. **Grow the data, train only.** The clips are written as new shards with a result marker,
   like an importer's, into the dataset's train split. The val split is pinned: its entry in
   the manifest — items, shards, checksums — is not touched (tests compare its sha256).
5. **Resume training** from the run's checkpoint on old + new data for `--steps` more steps
   (the cosine schedule is stretched to the new end: the learning rate re-warms to where the
   longer schedule puts it).
6. **Gate.** The candidate is promoted (RUN/promoted.json, which `exaflop serve RUN` hot
   reloads) only if, on paired held-out closed-loop seeds, its composite beats the
   incumbent's with the 95% bootstrap interval of the difference above zero, its collision
   rate is not higher, and its frozen-val ADE rose by no more than 2%.

Every round appends one JSON line to RUN/engine.jsonl: triggers by kind, clips added,
metrics before and after, the gate's decision and reasons, and seconds from the first
trigger to the promoted model (or null).
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np

from exaflop.drive import scores as S
from exaflop.drive.closedloop import (
    CONTROL,
    Clip,
    Episode,
    ego_frame,
    evaluate,
    hand_over,
    model_predictor,
)
from exaflop.errors import UserError

ENGINE_SEED_BASE = 2 * 10**9
STEER_GAP, ACCEL_GAP = 0.05, 2.5  # disagreement thresholds (rad, m/s^2)
TTC_TRIGGER = 1.0  # s
MAX_CLIPS_PER_EPISODE = 40


def engine_seed(seed: int, round_: int, i: int) -> int:
    return ENGINE_SEED_BASE + 100_003 * (1000 * seed + round_) + i


def _shadow_action(sim, ego, expert_speed: float) -> tuple[float, float]:
    """(acceleration m/s^2, steering rad, highway-env sign) the expert would command at the
    ego's current state: a copy of the expert stands in the ego's place for one act()."""
    from highway_env.vehicle.behavior import IDMVehicle

    road = sim.road
    shadow = IDMVehicle(road, ego.position.copy(), ego.heading, ego.speed,
                        target_lane_index=road.network.get_closest_lane_index(ego.position, ego.heading),
                        target_speed=expert_speed)
    i = road.vehicles.index(ego)
    road.vehicles[i] = shadow
    try:
        shadow.act()
    finally:
        road.vehicles[i] = ego
    return float(shadow.action["acceleration"]), float(shadow.action["steering"])


class ShadowEpisode(Episode):
    """A model episode that also records, per scored step, the input buffer, the model's
    command and the shadow expert's (`steps`); `actions` replays it."""

    def __init__(self, *a, **kw):
        super().__init__(*a, keep_frames=False, **kw)
        self.steps: list[dict] = []

    def observe(self, step, sim, ego, frames, speeds, steers, command) -> None:
        self.steps.append({"step": step, "frames": np.stack(frames), "speed": list(speeds),
                           "steering": list(steers), "model": command,
                           "shadow": _shadow_action(sim, ego, self.expert_speed)})


def triggers(ep: ShadowEpisode, trace: dict, fps: float) -> dict[int, set[str]]:
    """index into ep.steps -> the trigger kinds that selected it."""
    n = len(ep.steps)
    sel: dict[int, set[str]] = {}

    def mark(i0: int, i1: int, kind: str) -> None:
        for i in range(max(0, i0), min(n, i1 + 1)):
            sel.setdefault(i, set()).add(kind)

    two, one = int(2 * fps), int(fps)
    crashed = np.asarray(trace.get("crashed", []), bool)
    if crashed.any():
        mark(int(np.argmax(crashed)) - two, int(np.argmax(crashed)), "collision")
    on_road = np.asarray(trace.get("on_road", []), bool)
    if len(on_road) and not on_road.all():
        first = int(np.argmin(on_road))
        mark(first - two, first, "off_road")
    t = S.ttc(trace["gap"], trace["speed"], trace["lead_speed"]) if len(crashed) else np.zeros(0)
    for i in np.flatnonzero(t < TTC_TRIGGER):
        mark(int(i) - one, int(i), "ttc")
    if len(crashed) > 2:
        a = np.gradient(np.asarray(trace["speed"], float), 1.0 / fps)
        lo, hi = S.COMFORT["lon_accel"]
        for i in np.flatnonzero((a < lo) | (a > hi)):
            mark(int(i), int(i), "comfort")
    for i, s in enumerate(ep.steps):
        (am, sm), (ae, se) = s["model"], s["shadow"]
        if abs(sm - se) > STEER_GAP or abs(am - ae) > ACCEL_GAP:
            mark(i, i, "disagreement")
    return sel


def relabel(ep: ShadowEpisode, picked: list[int], clip: Clip) -> list[tuple[dict, dict, np.ndarray]]:
    """(telemetry, labels, frames) for each picked step: the episode is replayed with the
    model's recorded commands up to the step, then the expert drives from that state for
    the label horizon in a copy of the road."""
    from highway_env.vehicle.behavior import IDMVehicle

    from exaflop.drive.importers.sim import make_env

    so, T = ep.so, clip.frames
    want = {ep.steps[i]["step"]: i for i in picked}
    out: list[tuple[dict, dict, np.ndarray]] = []
    env, sim = make_env(so, ep.seed, action=CONTROL)
    try:
        for step in range(max(want) + 1):
            if step:
                env.step(ep.actions[step - 1])
            if step == T - 1:
                hand_over(sim)
            if step not in want:
                continue
            ego = sim.vehicle
            road = copy.deepcopy(sim.road)
            idx = sim.road.vehicles.index(ego)
            twin = road.vehicles[idx]
            expert = IDMVehicle(road, twin.position.copy(), twin.heading, twin.speed,
                                target_lane_index=road.network.get_closest_lane_index(twin.position, twin.heading),
                                target_speed=ep.expert_speed)
            road.vehicles[idx] = expert
            every = int(round(clip.dt * so.fps))
            pts, steer = [], []
            for n in range(clip.waypoints * every):
                road.act()
                road.step(1.0 / so.fps)
                if (n + 1) % every == 0:
                    pts.append(expert.position.copy())
                    steer.append(-math.degrees(expert.action.get("steering", 0.0)))
            wp = ego_frame(np.asarray(pts), ego.position, ego.heading)
            s = ep.steps[want[step]]
            tel = {"speed": [round(v, 4) for v in s["speed"]], "steering": [round(v, 4) for v in s["steering"]]}
            lab = {"waypoints": np.round(wp, 4).tolist(), "steering": [round(v, 4) for v in steer],
                   "wheelbase": 5.0, "steer_ratio": 1.0, "dt": clip.dt,
                   "source": "expert relabel of a state the model visited (DAgger)"}
            out.append((tel, lab, s["frames"]))
    finally:
        env.close()
    return out


def grow_dataset(data: str, round_: int, clips: list[tuple[dict, dict, np.ndarray]], clip: Clip, view: dict) -> dict:
    """Write the clips as new train shards + a result marker, then the manifest with them in
    its train split; the val split's entry is left exactly as it was."""
    from exaflop.drive import shards
    from exaflop.drive.importers.run import write_clips
    from exaflop.drive.store import Store

    store = Store(data)
    store.read_json(shards.MANIFEST, what="dataset manifest")  # a dataset is there
    item = f"engine-r{round_:03d}-{int(time.time())}"
    written, _, stats = write_clips(store, "train", item, ((j, f, tel, lab) for j, (tel, lab, f) in enumerate(clips)),
                                    clip.fps, clip.waypoints, clip.dt, per_shard=256)
    result = {"item": item, "group": item, "split": "train", "clips": len(clips), "shards": written,
              "labels_from": "expert relabel (DAgger)", "sources": {"engine_round": round_}, "stats": stats,
              "view": view}
    store.write_json(result, "items", f"{item}.json")
    add_train_items(store, [result], clip.waypoints)
    return result


def add_train_items(store, results: list[dict], waypoints: int) -> None:
    """List finished items (shards + result markers already in the store) in the manifest's
    train split; its val entry is left exactly as it was."""
    from exaflop.drive import shards
    from exaflop.drive.importers.run import _finish_stats

    manifest = store.read_json(shards.MANIFEST, what="dataset manifest")
    train = manifest["splits"]["train"]
    train["items"] = sorted({*train["items"], *(r["item"] for r in results)})
    for r in results:
        train["clips"] += r["clips"]
        train["shards"] += [{**s, "file": f"train/{s['file']}", "index": f"train/{s['index']}"} for s in r["shards"]]
        manifest["labels_from"][r["labels_from"]] = manifest["labels_from"].get(r["labels_from"], 0) + 1
    markers = [store.read_json("items", f"{i}.json", what="item result") for i in train["items"]]
    manifest["stats"] = _finish_stats(markers, waypoints) or manifest["stats"]
    added = sum(r["clips"] for r in results)
    c = manifest["counts"]
    c.update(items_found=c["items_found"] + len(results), items_ok=c["items_ok"] + len(results),
             clips=c["clips"] + added, clips_train=c["clips_train"] + added)
    store.write_json(manifest, shards.MANIFEST)


def clips_from_records(data: str, records: Path, telemetry: Path | None, round_: int) -> tuple[int, float | None]:
    """Import served requests (serve --drive-record-dir) whose telemetry has arrived, with the
    dataset's own clip geometry, and add them to its train split. Returns (clips added, the
    oldest record's arrival time). Drives already taken in an earlier round are skipped."""
    import shutil
    import tempfile

    from exaflop.drive import shards
    from exaflop.drive.importers.clips import ImportOptions
    from exaflop.drive.importers.records import read_records
    from exaflop.drive.importers.run import run_import
    from exaflop.drive.store import Store

    store = Store(data)
    manifest = store.read_json(shards.MANIFEST, what="dataset manifest")
    c = manifest["clip"]
    opts = ImportOptions(frames=c["frames"], fps=c["fps"], width=c["width"], height=c["height"], stride=c["stride"],
                         waypoints=c["waypoints"], dt=c["dt"], val_fraction=0.0, workers=0, max_bad_fraction=1.0,
                         wheelbase=manifest["vehicle"]["wheelbase"], steer_ratio=manifest["vehicle"]["steer_ratio"])
    opts.extra["telemetry_dir"] = str(telemetry) if telemetry else None
    taken = set(manifest["splits"]["train"]["items"]) | set(manifest["splits"]["val"]["items"])
    with tempfile.TemporaryDirectory(prefix="exaflop-engine-records-") as tmp:
        m = run_import("records", records, tmp, opts, provenance={"engine_round": round_}, quiet=True)
        new = [i for i in m["splits"]["train"]["items"] if not any(t.startswith(f"{i}-r") for t in taken)]
        results = []
        for item in new:
            r = json.loads((Path(tmp) / "items" / f"{item}.json").read_text())
            name = f"{item}-r{round_:03d}"  # a drive is taken once, with the records there are then
            shards_out = []
            for sh in r["shards"]:
                dst = sh["file"].replace(item, name, 1)
                shutil.copyfile(Path(tmp) / "train" / sh["file"], Path(data) / "train" / dst)
                idx = json.loads((Path(tmp) / "train" / sh["index"]).read_text())
                store.write_json({**idx, "shard": dst}, "train", dst.removesuffix(".tar") + ".idx.json")
                shards_out.append({**sh, "file": dst, "index": dst.removesuffix(".tar") + ".idx.json"})
            r.update(item=name, group=name, split="train", shards=shards_out,
                     labels_from=f"served records ({r['labels_from']})")
            store.write_json(r, "items", f"{name}.json")
            results.append(r)
    if results:
        add_train_items(store, results, c["waypoints"])
    received = [x.get("received") for recs in read_records(records).values() for x in recs if x.get("received")]
    return sum(r["clips"] for r in results), (min(received) if received else None)


def val_fingerprint(data: str) -> str:
    """sha256 of the manifest's val split entry (items, shards, checksums)."""
    import hashlib

    from exaflop.drive import shards
    from exaflop.drive.store import Store

    m = Store(data).read_json(shards.MANIFEST, what="dataset manifest")
    return hashlib.sha256(json.dumps(m["splits"]["val"], sort_keys=True).encode()).hexdigest()


def frozen_val_ade(ckpt: Path, data: str, limit: int = 0) -> float:
    from exaflop.drive.render import evaluate_split
    from exaflop.engine.checkpoint import load_for_inference

    _, task, model = load_for_inference(ckpt)
    task.use_data(data, "the data engine")
    return float(evaluate_split(task, model, task.build_dataset("val"), limit=limit)["val_ade"])


def gate(run_dir: Path, candidate: Path, incumbent: Path, data: str, episodes: int, seconds: float, seed: int,
         quiet: bool = True, val_limit: int = 0) -> dict:
    """Closed-loop composite (paired, CI above zero), collisions not worse, frozen-val ADE
    within +2%: the decision and every number behind it."""
    new = evaluate(candidate, ["model"], episodes, seconds, seed, quiet=quiet)
    old = evaluate(incumbent, ["model"], episodes, seconds, seed, quiet=quiet)
    ep = lambda r: [S.EpisodeScore(**{**e, "min_ttc": math.inf if e["min_ttc"] is None else e["min_ttc"]})  # noqa: E731
                    for e in r["policies"]["model"]["episodes"]]
    diff = S.paired_difference(ep(new), ep(old))
    agg_new, agg_old = new["policies"]["model"]["aggregate"], old["policies"]["model"]["aggregate"]
    ade_new, ade_old = frozen_val_ade(candidate, data, val_limit), frozen_val_ade(incumbent, data, val_limit)
    reasons = []
    if not diff["ci95"][0] > 0:
        reasons.append(f"composite difference {diff['mean']:+.3f}, 95% CI {diff['ci95']} not above zero")
    if agg_new["collision_rate"]["mean"] > agg_old["collision_rate"]["mean"]:
        reasons.append(f"collisions rose {agg_old['collision_rate']['mean']:.2f} -> {agg_new['collision_rate']['mean']:.2f}")
    if ade_new > 1.02 * ade_old:
        reasons.append(f"frozen-val ADE rose {ade_old:.4f} -> {ade_new:.4f} (> 2%)")
    return {"promote": not reasons, "reasons": reasons, "composite_diff": diff,
            "before": {"composite": agg_old["composite"], "collision_rate": agg_old["collision_rate"], "val_ade": ade_old},
            "after": {"composite": agg_new["composite"], "collision_rate": agg_new["collision_rate"], "val_ade": ade_new}}


def run_engine(run_dir: Path, rounds: int, episodes: int = 8, seconds: float = 20.0, steps: int = 200,
               eval_episodes: int = 20, eval_seconds: float = 20.0, seed: int = 0, quiet: bool = False,
               val_limit: int = 0, records: Path | None = None, telemetry: Path | None = None) -> list[dict]:
    """`records`: take the round's clips from served requests (serve --drive-record-dir)
    whose telemetry has arrived, instead of driving the simulator."""
    from exaflop.config import load_config, load_config_file
    from exaflop.drive.promote import promote, promoted
    from exaflop.engine.checkpoint import read_latest
    from exaflop.engine.trainer import train
    from exaflop.progress import console

    run_dir = Path(run_dir)
    cfg = load_config_file(run_dir / "config.toml")
    if cfg.task != "drive":
        raise UserError(f"{run_dir}: the data engine needs a driving run (task = drive), not {cfg.task!r}")
    data = cfg.data.path
    fingerprint = val_fingerprint(data)
    lines = []
    for r in range(rounds):
        incumbent = promoted(run_dir) or read_latest(run_dir / "checkpoints")[0]
        if incumbent is None or not incumbent.is_dir():
            raise UserError(f"{run_dir}: no complete checkpoint; train the run first")
        if promoted(run_dir) is None:  # round 0's model is what is served until a candidate wins;
            promote(run_dir, incumbent, by="data engine (the starting model)")  # and pinned against pruning
        predict, clip, so = model_predictor(incumbent)
        so.seconds = seconds
        t_first = None
        fired: dict[str, int] = {}
        clips: list = []
        added_from_records = 0
        if records is not None:
            console.rule(f"[bold]engine round {r + 1}/{rounds}: clips from served records in {records}")
            added_from_records, t_first = clips_from_records(data, records, telemetry, r + 1)
            fired = {"served_records": added_from_records} if added_from_records else {}
        for i in range(episodes if records is None else 0):
            ep = ShadowEpisode(engine_seed(seed, r, i), so, clip, "model", predict=predict)
            trace, _, _ = ep.run()
            sel = triggers(ep, trace, so.fps)
            if sel and t_first is None:
                t_first = time.time()
            for kinds in sel.values():
                for k in kinds:
                    fired[k] = fired.get(k, 0) + 1
            picked = sorted(sel)[::2][:MAX_CLIPS_PER_EPISODE]  # every other selected step
            if picked:
                clips += relabel(ep, picked, clip)
        line = {"round": r + 1, "incumbent": str(incumbent.relative_to(run_dir)), "triggers": fired,
                "clips_added": len(clips) + added_from_records, "promoted": False,
                "seconds_first_trigger_to_served": None}
        if not line["clips_added"]:
            line["reasons"] = ["no trigger fired and no new records: nothing to learn from"]
        else:
            if clips:
                view = json.loads((run_dir / "dataset.json").read_text()).get("view", {})
                grow_dataset(data, r + 1, clips, clip, view)
            if val_fingerprint(data) != fingerprint:  # the pin, checked every round
                raise RuntimeError(f"{data}: the val split changed during engine round {r + 1}; it must never")
            step = json.loads((incumbent / "meta.json").read_text())["step"]
            latest = read_latest(run_dir / "checkpoints")[0]
            last = json.loads((latest / "meta.json").read_text())["step"]
            overrides = [f"train.steps={last + steps}", f"run.out_dir={run_dir.parent}", f"run.name={run_dir.name}",
                         f"checkpoint.every={steps}", "eval.every=0"]
            console.print(f"{line['clips_added']} clips added ({fired}); training {steps} steps from step {last}")
            train(load_config(str(run_dir / "config.toml"), overrides), resume=True, quiet=quiet)
            candidate = read_latest(run_dir / "checkpoints")[0]
            decision = gate(run_dir, candidate, incumbent, data, eval_episodes, eval_seconds, seed, quiet=quiet,
                            val_limit=val_limit)
            line["promoted"] = decision.pop("promote")
            line.update(candidate=str(candidate.relative_to(run_dir)), incumbent_step=step, **decision)
            if line["promoted"]:
                promote(run_dir, candidate, by="data engine", round=r + 1)
                if t_first is not None:
                    line["seconds_first_trigger_to_served"] = round(time.time() - t_first, 1)
        line["val_fingerprint"] = fingerprint
        with open(run_dir / "engine.jsonl", "a") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")
        console.print(f"round {r + 1}: {'promoted' if line['promoted'] else 'kept the incumbent'}"
                      + (f" ({'; '.join(line.get('reasons', []))})" if not line["promoted"] else ""))
        lines.append(line)
    return lines
