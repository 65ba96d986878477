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
