"""engine/checkpoint.py for real on disk, one process: which checkpoint counts as the latest,
what a damaged one says, and that a save (sync or async) loads back exactly."""

from __future__ import annotations

import json

import pytest
import torch

from exaflop.engine.checkpoint import (
    Checkpointer,
    latest_complete,
    list_checkpoints,
    read_latest,
    verify,
)
from exaflop.errors import UserError


def fake_ckpt(root, step: int, files: dict[str, bytes] | None = None, meta: dict | str | None = "ok"):
    d = root / f"step_{step:09d}"
    d.mkdir(parents=True)
    files = {"a.distcp": b"1234"} if files is None else files
    for name, data in files.items():
        (d / name).write_bytes(data)
    if meta == "ok":
        meta = {"step": step, "files": {n: len(b) for n, b in files.items()}}
    if isinstance(meta, dict):
        (d / "meta.json").write_text(json.dumps(meta))
    elif isinstance(meta, str):
        (d / "meta.json").write_text(meta)
    return d


def test_checkpoints_are_listed_newest_step_first(tmp_path):
    for s in (9, 100, 10):
        fake_ckpt(tmp_path, s)
    (tmp_path / ".tmp-step_000000200").mkdir()
    (tmp_path / "step_000000300").write_text("a file, not a checkpoint")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000100", "step_000000010", "step_000000009"]
    assert list_checkpoints(tmp_path / "none") == []


def test_verify_names_what_is_wrong(tmp_path):
    assert verify(fake_ckpt(tmp_path, 1)) is None
    d = fake_ckpt(tmp_path, 2, meta=None)
    assert verify(d) == f"{d}: meta.json missing (the write did not finish)"
    d = fake_ckpt(tmp_path, 3, meta="{not json")
    assert verify(d) == f"{d / 'meta.json'}: not valid JSON"
    d = fake_ckpt(tmp_path, 4)
    (d / "a.distcp").unlink()
    assert verify(d) == f"{d}: shard a.distcp is missing"
    d = fake_ckpt(tmp_path, 5)
    (d / "a.distcp").write_bytes(b"12")
    assert verify(d) == f"{d}: shard a.distcp is truncated (2 of 4 bytes)"
    assert verify(fake_ckpt(tmp_path, 6, meta={"step": 6})) is None  # no file list: nothing to check


def test_latest_names_the_checkpoint_unless_it_is_broken(tmp_path):
    five, ten = fake_ckpt(tmp_path, 5), fake_ckpt(tmp_path, 10)
    assert read_latest(tmp_path) == (ten, [])  # no `latest`: the newest that verifies
    (tmp_path / "latest").write_text("step_000000005\n")
    assert read_latest(tmp_path) == (five, [])  # `latest` wins over anything newer
    (five / "a.distcp").unlink()
    got, problems = read_latest(tmp_path)
    assert got == ten and problems == [f"{five}: shard a.distcp is missing"]
    (tmp_path / "latest").write_text("step_000000007\n")  # names nothing that exists
    assert read_latest(tmp_path)[0] == ten


def test_no_complete_checkpoint_is_one_line_naming_the_first_problem(tmp_path):
    with pytest.raises(UserError) as e:
        latest_complete(tmp_path, "--resume")
    assert str(e.value) == f"--resume: no complete checkpoint under {tmp_path}"
    d = fake_ckpt(tmp_path, 3, meta=None)
    fake_ckpt(tmp_path, 1, meta="{")
    with pytest.raises(UserError) as e:
        latest_complete(tmp_path, "eval")
    assert str(e.value) == (f"eval: no complete checkpoint under {tmp_path} "
                            f"({d}: meta.json missing (the write did not finish))")


def model_and_optim(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_save_then_load_gives_the_same_state_and_keeps_the_newest(tmp_path, async_save):
    model, opt = model_and_optim(0)
    ck = Checkpointer(tmp_path, keep=2, async_save=async_save)
    rng = {"torch": torch.get_rng_state()}
    for step in (1, 2, 3):
        with torch.no_grad():
            model[0].weight.add_(1.0)  # each save holds different values
        blocked = ck.save(model, opt, {"step": step, "note": "x"}, rng)
        assert blocked >= 0
        ck.wait_staged()
    ck.wait()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000003", "step_000000002"]  # keep=2
    assert (tmp_path / "latest").read_text() == "step_000000003\n"
    assert not list(tmp_path.glob(".tmp-*"))
    meta = json.loads((tmp_path / "step_000000003" / "meta.json").read_text())
    assert meta["step"] == 3 and meta["note"] == "x" and meta["world_size"] == 1
    assert meta["files"] and all((tmp_path / "step_000000003" / n).stat().st_size == s for n, s in meta["files"].items())
    assert "rng_rank00000.pt" in meta["files"]
    fresh, fresh_opt = model_and_optim(1)
    got_meta, got_rng, problems = Checkpointer(tmp_path).load(fresh, fresh_opt)
    assert got_meta["step"] == 3 and problems == []
    assert torch.equal(got_rng["torch"], rng["torch"])
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)


def test_a_checkpoint_from_another_world_size_loads_without_rng(tmp_path):
    model, opt = model_and_optim(0)
    Checkpointer(tmp_path).save(model, opt, {"step": 1}, {"torch": torch.get_rng_state()})
    meta_path = tmp_path / "step_000000001" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "world_size": 2}))
    fresh, _ = model_and_optim(1)
    got_meta, rng, _ = Checkpointer(tmp_path).load(fresh, None)  # weights only, no optimizer
    assert rng is None and got_meta["world_size"] == 2
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True))


def test_optimizer_state_loads_into_another_grouping_and_old_checkpoints_still_load(tmp_path):
    """Expert-parallel runs group the optimizer's parameters by mesh (engine/optim.py), so the
    saved state is keyed by parameter name and loads into any grouping; a checkpoint written
    before that (param groups saved as lists, no "optim_format" in meta.json) still loads."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt = model_and_optim(0)
    Checkpointer(tmp_path / "new").save(model, opt, {"step": 1}, {})
    fresh, _ = model_and_optim(1)
    fresh.zero_grad(set_to_none=True)  # as at a resume: an optimizer that never stepped
    regrouped = torch.optim.AdamW([{"params": [fresh[0].weight]}, {"params": [fresh[0].bias]},
                                   {"params": list(fresh[2].parameters()), "weight_decay": 0.0}], lr=0.1)
    Checkpointer(tmp_path / "new").load(fresh, regrouped)
    want = opt.state_dict()["state"]
    got = {id(p): regrouped.state[p] for g in regrouped.param_groups for p in g["params"]}
    for i, p in enumerate(fresh.parameters()):
        assert torch.equal(got[id(p)]["exp_avg"], want[i]["exp_avg"])
    assert regrouped.param_groups[2]["weight_decay"] == 0.01  # the saved hyperparameters win

    old = tmp_path / "old" / "step_000000001"  # what Checkpointer.save wrote before "flat"
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(old))
    (old / "meta.json").write_text(json.dumps({"step": 1, "world_size": 1}))
    fresh, fresh_opt = model_and_optim(1)
    Checkpointer(tmp_path / "old").load(fresh, fresh_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True))
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], want[0]["exp_avg"])


def test_pruning_never_removes_a_pinned_checkpoint(tmp_path):
    """A driving run's promoted checkpoint is pinned: training on (and pruning to `keep`)
    must not delete what a server is serving."""
    from exaflop.engine.checkpoint import Checkpointer, list_checkpoints, pin_checkpoint

    for step in (100, 200, 300, 400):
        (tmp_path / f"step_{step:09d}").mkdir()
    pin_checkpoint(tmp_path, "step_000000100")
    Checkpointer(tmp_path, keep=2)._prune()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000400", "step_000000300", "step_000000100"]
    pin_checkpoint(tmp_path, "step_000000300")  # a new promotion replaces the pin
    Checkpointer(tmp_path, keep=1)._prune()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000400", "step_000000300"]
