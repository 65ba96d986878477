import pytest
import tomllib

from exaflop.config import load_config, load_config_file, save_config
from exaflop.errors import UserError


def test_presets_load_with_their_shapes():
    tiny = load_config("lm-tiny")
    assert tiny.task == "lm" and tiny.model.n_layer == 4 and tiny.model.n_kv_head == 2
    small = load_config("lm-small")
    assert (small.model.n_layer, small.model.d_model, small.model.n_head) == (6, 384, 6)
    assert load_config("lm-124m").model.d_model == 768


def test_overrides_are_typed():
    cfg = load_config("lm-tiny", ["optim.lr=3e-4", "train.steps=7", "run.compile=true", "run.name=x"])
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.train.steps == 7 and cfg.run.compile is True
    assert cfg.run.name == "x"


@pytest.mark.parametrize("override, needle", [
    ("optim.lrr=1", "unknown key 'optim.lrr'"),
    ("model.n_layer=many", "model.n_layer = 'many'"),
    ("train.steps=0", "train.steps"),
    ("nosuch.key=1", "unknown key 'nosuch'"),
    ("model.d_model=130", "not divisible by n_head"),
])
def test_bad_keys_and_types_name_the_key(override, needle):
    with pytest.raises(UserError) as e:
        load_config("lm-tiny", [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(UserError, match="lm-tiny"):
        load_config("lm-nope")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("lm-tiny", ["optim.lr=0.002", "model.n_experts=4", "model.top_k=2"])
    save_config(cfg, tmp_path / "config.toml")
    tomllib.loads((tmp_path / "config.toml").read_text())  # valid TOML
    again = load_config_file(tmp_path / "config.toml")
    assert again == cfg and again.hash() == cfg.hash()
