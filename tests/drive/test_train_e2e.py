"""End to end: simulate, import, train drive-tiny with the engine, beat both baselines,
then the CLI's eval and render on the run."""

import json

import pytest

pytest.importorskip("highway_env")

pytestmark = pytest.mark.slow  # ~1 minute on 2 cores


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from exaflop.config import load_config
    from exaflop.drive.importers.sim import SimOptions, run_sim_import
    from exaflop.engine.trainer import train

    root = tmp_path_factory.mktemp("e2e")
    run_sim_import(root / "sim", SimOptions(episodes=10, seconds=24.0, workers=2), quiet=True)
    cfg = load_config("drive-tiny", [f"data.path={root / 'sim'}", f"run.out_dir={root / 'runs'}",
                                     "train.steps=400", "eval.every=0", "checkpoint.every=0",
                                     "run.tensorboard=false"])
    result = train(cfg, quiet=True)
    return root, result


def test_tiny_model_beats_both_baselines_on_held_out_episodes(trained):
    from exaflop.drive.render import evaluate_split
    from exaflop.engine.checkpoint import load_for_inference

    root, result = trained
    assert result["val_ade"] < min(result["val_cv_ade"], result["val_hold_ade"])
    _, task, model = load_for_inference(result["run_dir"])
    full = evaluate_split(task, model, task.build_dataset("val"))  # every held-out clip
    assert full["val_ade"] < full["val_cv_ade"] and full["val_ade"] < full["val_hold_ade"], full
    assert full["val_l2_mean_to_3s"] <= full["val_l2_at_3s"]


def test_cli_eval_and_render(trained, capsys):
    from exaflop.cli import main

    root, result = trained
    assert main(["drive", "eval", result["run_dir"], "--json", "--limit", "40"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["clips"] == 40 and "val_hold_l2_at_2s" in metrics
    out = root / "render"
    assert main(["drive", "render", result["run_dir"], "--clips", "3", "--out", str(out)]) == 0
    assert (out / "clips.mp4").stat().st_size > 1000 and (out / "contact_sheet.png").stat().st_size > 1000
    import av

    with av.open(str(out / "clips.mp4")) as c:
        assert c.streams.video[0].codec_context.name == "h264" and c.streams.video[0].frames > 3 * 8


def test_closed_loop_against_every_baseline(trained, capsys):
    """The trained model drives the simulator from its own frames beside every baseline on
    the same held-out seeds, through the CLI.

    What it must beat, and why: hold-steering on progress — holding the last steering angle
    turns the car off its lane for good, while the model predicts waypoints along the road.
    What it does NOT beat (a finding, docs/drive.md "Closed loop"): constant velocity on the
    composite. Trained on expert driving only, the model never saw the car off the lane
    centre, so small heading errors compound into drift it does not correct — the covariate
    shift the data engine's DAgger relabelling exists for. This test reports that comparison
    rather than asserting it either way."""
    import json

    from exaflop.cli import main

    root, result = trained
    out = root / "closed_loop"
    assert main(["drive", "closed-loop", result["run_dir"], "--episodes", "4", "--seconds", "10", "--quiet",
                 "--json", "--render", "--out", str(out)]) == 0
    r = json.loads(capsys.readouterr().out)
    agg = {p: v["aggregate"] for p, v in r["policies"].items()}
    assert set(agg) == {"model", "model-no-video", "expert", "expert-no-lane-change", "expert-tracked",
                        "constant-velocity", "hold-steering"}
    assert agg["expert"]["collision_rate"]["mean"] == 0.0 and agg["expert"]["progress"]["mean"] == 1.0
    assert agg["expert-tracked"]["progress"]["mean"] >= 0.95  # the tracker works on these seeds
    assert agg["model"]["progress"]["mean"] > agg["hold-steering"]["progress"]["mean"], agg
    assert set(r["model_vs"]) == set(agg) - {"model"}
    print("closed loop: model - constant velocity composite", r["model_vs"]["constant-velocity"])
    assert (out / "closed_loop.png").stat().st_size > 5000 and (out / "closed_loop.json").is_file()
    import av

    with av.open(str(out / "closed_loop.mp4")) as c:
        assert c.streams.video[0].frames >= 20  # the model's steps, its plan drawn on each
