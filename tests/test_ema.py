"""The weight average of train.ema (vaegan.ema) against its formula, and across a resume."""

import copy

import pytest
import torch

from vaegan.ema import EMA, RAMPUP
from vaegan.model import VAEGAN
from vaegan.step import TrainStep


def batch(cfg, n=8):
    m = cfg.model
    return torch.rand(n, m.channels, m.image_size, m.image_size) * 2 - 1


def flat(net):
    return torch.cat([t.detach().float().flatten() for t in net.state_dict().values()])


def test_the_average_follows_its_formula_with_the_ramp_up(debug_cfg):
    torch.manual_seed(0)
    model = VAEGAN(debug_cfg.model)
    step = TrainStep.for_model(model, debug_cfg)
    ema = EMA(model, decay=0.9)
    expected = None
    for t in range(4):
        step(batch(debug_cfg))
        ema.update(model)
        live = {k: v.detach().clone() for k, v in model.decoder.state_dict().items()}
        d = min(0.9, (1 + t) / (RAMPUP + t))  # t updates so far (the first one copies)
        expected = live if expected is None else {
            k: (d * expected[k] + (1 - d) * v) if v.is_floating_point() else v for k, v in live.items()}
    for k, v in ema.decoder.module.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6, msg=k)
    # what is served: the averaged encoder and decoder, the live discriminator's weights in a
    # network of its own, so switching the served model to eval mode leaves training alone
    served = ema.served_with(model.discriminator)
    assert served.decoder is ema.decoder.module and served.discriminator is not model.discriminator
    assert torch.equal(flat(served.discriminator), flat(model.discriminator))
    assert not torch.equal(flat(served.encoder), flat(model.encoder))
    served.eval()
    assert model.training and all(m.training for m in model.modules())


def test_a_restored_average_continues_as_if_never_stopped(debug_cfg):
    """What a resume does: the averages from a checkpoint's served model and update count,
    then the same live weights folded in, give the uninterrupted run's averages."""
    torch.manual_seed(0)
    model = VAEGAN(debug_cfg.model)
    step = TrainStep.for_model(model, debug_cfg)
    ema = EMA(model, decay=0.99)
    lives = []
    for t in range(4):
        step(batch(debug_cfg))
        ema.update(model)
        lives.append(copy.deepcopy(model.state_dict()))
        if t == 1:
            served, updates = copy.deepcopy(ema.served.state_dict()), ema.updates
    resumed = VAEGAN(debug_cfg.model)
    resumed.load_state_dict(served)
    other = EMA(resumed, decay=0.99)
    other.reset(resumed, updates)
    for live in lives[2:]:
        resumed.load_state_dict(live)
        other.update(resumed)
    assert other.updates == ema.updates == 4
    for net in ("encoder", "decoder"):
        torch.testing.assert_close(flat(getattr(other.served, net)), flat(getattr(ema.served, net)))
    fresh = EMA(resumed, decay=0.99)  # not restored: the first update copies the live weights
    fresh.update(resumed)
    assert not torch.equal(flat(fresh.served.decoder), flat(ema.served.decoder))


def test_bad_decay_is_refused():
    from vaegan.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"train.ema"):
        load_config("debug", overrides=["train.ema=1.5"])
