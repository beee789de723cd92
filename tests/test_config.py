import pytest
import yaml
from servers import own_lines

from vaegan.cli import main
from vaegan.config import PRESETS, ConfigError, config_from_dict, load_config


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_validates_and_round_trips(name):
    cfg = load_config(name)
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  gamma: 0.5\ntrain:\n  steps: 7\n")
    cfg = load_config("debug", path, ["loss.gamma=0.25", "train.name=x", "optim.betas=[0.9,0.99]"])
    assert (cfg.loss.gamma, cfg.train.steps, cfg.train.name) == (0.25, 7, "x")
    assert cfg.optim.betas == (0.9, 0.99)
    assert load_config("debug", overrides=["optim.lr=5e-4"]).optim.lr == 5e-4  # YAML 1.1 string


@pytest.mark.parametrize(("override", "message"), [
    ("loss.gama=1", "unknown config key 'loss.gama'; loss has: mode, recipe, gamma"),
    ("los.gamma=1", "unknown config key 'los.gamma'"),
    ("loss.recipe=authors", "loss.recipe='authors' is not allowed; choose one of: paper | reference"),
    ("train.steps=abc", "train.steps='abc' is not allowed; it must be an integer"),
    ("train.steps=0", "train.steps=0 is not allowed; it must be an integer >= 1"),
    ("loss.kl_weight=0", "loss.kl_weight=0.0 is not allowed; it must be a finite number > 0 (1: the paper)"),
    ("model.image_size=48", "model.image_size=48 is not allowed; choose one of: 32 | 64 | 128"),
    ("loss.attribute_llike=1", "loss.attribute_llike=1.0 is not allowed; it must be 0 unless "
                               "loss.attribute_weight > 0 trains the attribute head it reads"),
    ("train.use_gpu=maybe", "train.use_gpu='maybe' is not allowed; it must be true or false"),
    ("gamma", "not of the form key=value"),
])
def test_bad_overrides_name_the_key_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("debug", overrides=[override])
    assert message in str(err.value)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'big'; choose one of: debug"):
        load_config("big")


def test_cli_config_show_prints_resolved_yaml(capsys):
    assert main(["config", "show", "debug", "loss.gamma=0.5"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["loss"]["gamma"] == 0.5
    assert config_from_dict(shown) == load_config("debug", overrides=["loss.gamma=0.5"])


def test_cli_bad_key_is_one_line_no_traceback(capsys):
    assert main(["config", "show", "debug", "train.stepz=3"]) == 2
    err = own_lines(capsys.readouterr().err)
    assert err.startswith("vaegan: error: unknown config key 'train.stepz'")
    assert "Traceback" not in err
