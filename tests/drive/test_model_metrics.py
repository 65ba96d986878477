"""Metric definitions, baselines, and the models' shapes and starting point."""

import math

import pytest
import torch

from exaflop.config import load_config
from exaflop.drive import metrics as M
from exaflop.drive.model import DriveModel
from exaflop.drive.task import count_flops


def test_two_l2_definitions_are_named_apart():
    k, dt = 6, 0.5
    gt = torch.zeros(2, k, 2)
    pred = gt.clone()
    pred[..., 0] = torch.arange(1, k + 1, dtype=torch.float32)  # error k metres at step k
    meter = M.TrajectoryMeter(k, dt)
    meter.add(pred, gt, torch.ones(2, k), torch.zeros(2, k))
    r = meter.result("val_")
    assert r["val_ade"] == pytest.approx(3.5) and r["val_fde"] == 6
    assert r["val_l2_at_1s"] == 2 and r["val_l2_mean_to_1s"] == pytest.approx(1.5)  # at 1 s vs mean of 0.5, 1 s
    assert r["val_l2_at_3s"] == 6 and r["val_l2_mean_to_3s"] == pytest.approx(3.5)
    assert r["val_steer_mae_deg"] == 1
    # A horizon that is not a multiple of dt is left out rather than misreported.
    odd = M.TrajectoryMeter(4, 0.3)
    odd.add(pred[:, :4], gt[:, :4], torch.ones(2, 4), torch.zeros(2, 4))
    assert "l2_at_1s" not in odd.result() and "l2_at_3s" not in odd.result() and odd.result()["fde"] == 4
    # An empty meter reports nothing (rather than NaN); one clip is enough to report.
    assert M.TrajectoryMeter(2, 0.4).result() == {}
    one = M.TrajectoryMeter(2, 0.5)
    one.add(pred[:1, :2], gt[:1, :2], torch.zeros(1, 2), torch.zeros(1, 2))
    assert one.result()["ade"] == pytest.approx(1.5)


def test_errors_are_euclidean_and_averaged_over_every_clip_of_every_batch():
    # 3-4-5 triangles: an error of (3, 4) is 5 m (L1 would say 7, L-inf 4). Two batches of
    # different sizes, so a meter that averaged batch means (not clips) would be caught too.
    k, dt = 2, 1.0
    meter = M.TrajectoryMeter(k, dt)
    pred1 = torch.tensor([[[3.0, 4.0], [6.0, 8.0]]])  # one clip: errors 5, 10
    meter.add(pred1, torch.zeros(1, k, 2), torch.zeros(1, k), torch.zeros(1, k))
    pred2 = torch.tensor([[[1.0, 1.0], [0.0, -4.0]], [[-3.0, -4.0], [2.0, 3.0]]])  # errors 0, 5 / 5, 0
    gt2 = torch.tensor([[[1.0, 1.0], [3.0, 0.0]], [[0.0, 0.0], [2.0, 3.0]]])
    meter.add(pred2, gt2, torch.full((2, k), 2.0), torch.full((2, k), 5.0))
    r = meter.result()
    # per step over 3 clips: step 1 (5 + 0 + 5) / 3, step 2 (10 + 5 + 0) / 3
    assert r["fde"] == pytest.approx(5.0) and r["l2_at_2s"] == pytest.approx(5.0)
    assert r["ade"] == pytest.approx((10 / 3 + 5) / 2) and r["l2_at_1s"] == pytest.approx(10 / 3)
    assert r["steer_mae_deg"] == pytest.approx(6 / 3)  # |0 - 0| on the first clip, |2 - 5| on two


def test_error_sums_keep_precision_over_a_long_evaluation():
    # A long eval sums millions of per-clip errors: float32 sums would drop the small ones.
    # 2^24 + 1 is the first integer float32 cannot hold.
    meter = M.TrajectoryMeter(1, 1.0)
    big, small = torch.tensor([[[2.0**24, 0.0]]]), torch.tensor([[[1.0, 0.0]]])
    meter.add(big, torch.zeros(1, 1, 2), torch.full((1, 1), 2.0**24), torch.zeros(1, 1))
    meter.add(small, torch.zeros(1, 1, 2), torch.ones(1, 1), torch.zeros(1, 1))
    r = meter.result()
    assert r["ade"] == (2.0**24 + 1) / 2 and r["steer_mae_deg"] == (2.0**24 + 1) / 2


def test_baselines():
    batch = {"speed": torch.tensor([[9.0, 10.0]]), "steering": torch.tensor([[0.0, 30.0]]),
             "future_steering": torch.zeros(1, 3), "vehicle": torch.tensor([[2.5, 15.0, 1.0]])}
    b = M.baselines(batch, 3)
    assert torch.allclose(b["cv"][0][0], torch.tensor([[10.0, 0], [20, 0], [30, 0]]))
    radius = 2.5 / math.tan(math.radians(2.0))
    theta = 10.0 / radius
    assert torch.allclose(b["hold"][0][0, 0], torch.tensor([radius * math.sin(theta), radius * (1 - math.cos(theta))]))
    assert torch.equal(b["hold"][1], torch.full((1, 3), 30.0)) and torch.equal(b["cv"][1], torch.zeros(1, 3))


@pytest.mark.parametrize("arch", ["vit", "pilotnet"])
def test_untrained_model_is_exactly_the_baselines(arch):
    cfg = load_config("drive-tiny", [f"model.arch={arch}"])
    stats = {"residual_std": [[0.1, 0.2]] * 6, "speed_mean": 20.0, "speed_std": 2.0, "steering_rms": 1.0}
    model = DriveModel(cfg.model, stats, dt=0.5)
    video = torch.randint(0, 255, (3, 8, 3, 64, 64), dtype=torch.uint8)
    speed, steering = torch.full((3, 8), 20.0), torch.randn(3, 8)
    wp, steer = model(video, speed, steering)
    assert wp.shape == (3, 6, 2) and steer.shape == (3, 6)
    batch = {"speed": speed, "steering": steering, "future_steering": steer, "vehicle": torch.tensor([[5.0, 1, 0.5]] * 3)}
    assert torch.allclose(wp, M.baselines(batch, 6)["cv"][0])  # zero-initialised head: residual 0
    assert torch.allclose(steer, steering[:, -1:].expand(-1, 6))
    assert count_flops(model, cfg.model) > 1e6
    # Dataset statistics travel inside the state dict.
    assert torch.equal(model.state_dict()["resid_std"], torch.tensor(stats["residual_std"]))


def test_config_errors_name_the_field():
    from exaflop.errors import UserError

    with pytest.raises(UserError, match="model"):
        load_config("drive-tiny", ["model.patch=12"])
    with pytest.raises(UserError, match="unknown key"):
        load_config("drive-tiny", ["data.bogus=1"])


def test_photometric_jitter_is_applied_on_the_device():
    torch.manual_seed(0)
    cfg = load_config("drive-tiny", ["model.use_ego_state=false"])
    model = DriveModel(cfg.model, {}, dt=0.5)
    torch.nn.init.normal_(model.head.weight)  # make the output depend on the pixels
    video = torch.randint(0, 255, (2, 8, 3, 64, 64), dtype=torch.uint8)
    speed, steering = torch.zeros(2, 8), torch.zeros(2, 8)
    plain, _ = model(video, speed, steering)
    same, _ = model(video, speed, steering, torch.ones(2, 2))
    darker, _ = model(video, speed, steering, torch.tensor([[0.7, 1.0], [0.7, 1.0]]))
    # (x - mean) * 1 + mean * 1 is x only up to float rounding, which the normal-init head
    # amplifies to ~1e-5 on outputs of ~10; a 0.7 brightness moves them by tens.
    assert (plain - same).abs().max() < 1e-3
    assert (plain - darker).abs().max() > 1.0
