import pytest
import yaml
from servers import own_lines

from vaegan.cli import main, parse_args
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


def test_overrides_may_follow_options():
    args = parse_args(["tune", "--preset", "mnist32", "a.b=1", "--trials", "8", "c.d=2", "--seeds", "2",
                       "e.f=3"])
    assert (args.overrides, args.trials, args.seeds) == (["a.b=1", "c.d=2", "e.f=3"], 8, 2)
    assert parse_args(["train", "--preset", "debug", "train.steps=5"]).overrides == ["train.steps=5"]


@pytest.mark.parametrize("argv, bad", [(["tune", "--trials", "8", "x.y=1", "--bogus"], "--bogus"),
                                       (["tune", "x.y=1", "--trials", "8", "stray", "--seeds", "2"], "stray"),
                                       (["models", "list", "m", "a.b=1"], "a.b=1")])  # takes no overrides
def test_what_is_neither_an_option_nor_an_override_is_refused(argv, bad, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert f"unrecognized arguments: {bad}" in capsys.readouterr().err
