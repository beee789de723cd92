"""train.compile=true: the step under torch.compile computes the eager step's gradients.

What torch.compile traces is the step written as a pure function (gradients returned by
torch.autograd.grad instead of accumulated by backward passes); the fast tests check that
form in eager mode for every mode, the slow one compiles it (minutes on 2 CPU cores)."""

import copy

import pytest
import torch

from vaegan.model import VAEGAN
from vaegan.step import TrainStep


def grads(module):
    return [p.grad for p in module.parameters()]


def eager_and_compiled(cfg):
    model = VAEGAN(cfg.model)
    compiled_model = copy.deepcopy(model)
    compiled_cfg = copy.deepcopy(cfg)
    compiled_cfg.train.compile = True
    return (model, TrainStep.for_model(model, cfg),
            compiled_model, TrainStep.for_model(compiled_model, compiled_cfg))


def assert_same_gradients(cfg, calls, rtol, atol, scale=0.0):
    """`calls` gradient computations (no optimizer steps: RMSProp's first step is about
    lr * sign(g), which would turn rounding differences of tiny gradients into 2 * lr).
    Each element within atol + rtol * its size + `scale` * the tensor's largest."""
    model, eager, compiled_model, compiled = eager_and_compiled(cfg)
    m = cfg.model
    x = torch.rand(8, m.channels, m.image_size, m.image_size) * 2 - 1
    attrs = (torch.rand(8, m.dis_attributes) > 0.5).float() if m.dis_attributes else None
    for _ in range(calls):
        for p in (*model.parameters(), *compiled_model.parameters()):
            p.grad = None
        noise = (torch.randn(8, m.latent_dim), torch.randn(8, m.latent_dim))
        m_eager = eager.compute_gradients(x, noise, attrs)
        m_compiled = compiled.compute_gradients(x, noise, attrs)
        for name in ("encoder", "decoder", "discriminator"):
            for i, (a, b) in enumerate(zip(grads(getattr(model, name)),
                                           grads(getattr(compiled_model, name)), strict=True)):
                if a is None or b is None:  # a network the mode does not train
                    assert a is None and b is None, f"{name} param {i}"
                    continue
                torch.testing.assert_close(b, a, rtol=rtol, atol=atol + scale * a.abs().max().item(),
                                           msg=lambda m, i=i, name=name: f"{name} param {i}: {m}")
        assert m_compiled == pytest.approx(m_eager, rel=1e-4, abs=1e-6)
    for (k, a), b in zip(model.state_dict().items(), compiled_model.state_dict().values(),
                         strict=True):  # batch-norm statistics (the weights did not move)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize(("mode", "recipe", "generator", "attribute_weight"), [
    ("vaegan", "paper", "minimax", 0), ("vaegan", "reference", "nonsaturating", 0),
    ("vae", "paper", "minimax", 0), ("gan", "paper", "nonsaturating", 0),
    ("vaegan", "paper", "minimax", 2), ("gan", "paper", "minimax", 2)])
def test_the_traced_form_of_the_step_has_the_eager_gradients(debug_cfg, monkeypatch, mode,
                                                             recipe, generator, attribute_weight):
    """attribute_weight > 0: with Dis's attribute head (3 labels)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # the form, not compiled
    L = debug_cfg.loss
    L.mode, L.recipe, L.generator, L.gamma, L.w = mode, recipe, generator, 0.3, 0.4
    L.attribute_weight, debug_cfg.model.dis_attributes = attribute_weight, 3 if attribute_weight else 0
    assert_same_gradients(debug_cfg, calls=1, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_compiled_step_has_the_eager_gradients(debug_cfg):
    """On the compiling call and on the next one (which runs the compiled code).

    Inductor's fused kernels sum in another order than eager's, and batch norm over 8 images
    and a saturating discriminator amplify that: on an AVX2-only CPU (AMD EPYC) an element
    was 2.3e-4 off in a tensor whose largest gradient is 1.29 (5.7e-5 of its norm), and over
    six seeds up to 0.4% of a tensor's largest gradient (it passed elementwise on Intel AMX
    machines). Hence the allowance of 1% of each tensor's largest; a missing or misplaced
    term (a wrong gradient cut, gamma not applied) moves gradients by tens of percent."""
    debug_cfg.loss.gamma = 0.3  # both parts of the decoder's gradient visible
    assert_same_gradients(debug_cfg, calls=2, rtol=1e-3, atol=1e-5, scale=1e-2)


def test_compile_refuses_ddp_wrapped_networks(debug_cfg, monkeypatch):
    """The compiled step returns gradients instead of accumulating them, which is when DDP's
    hooks all-reduce: under DDP it would silently train each rank on its own gradients."""
    class FakeDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, module):  # no process group needed to be recognised
            torch.nn.Module.__init__(self)
            self.module = module

    debug_cfg.train.compile = True
    model = VAEGAN(debug_cfg.model)
    with pytest.raises(ValueError, match="one worker"):
        TrainStep(FakeDDP(model.encoder), model.decoder, model.discriminator, debug_cfg)


def test_training_refuses_compile_with_several_workers(debug_cfg):
    """Refused with the keys to change before any Ray worker starts (vaegan train and tune)."""
    from vaegan.config import ConfigError
    from vaegan.train import build_trainer

    debug_cfg.train.compile, debug_cfg.train.num_workers = True, 2
    with pytest.raises(ConfigError, match=r"train.compile=true .* train.num_workers=2 .*num_workers=1"):
        build_trainer(debug_cfg, "run", "uri", "", storage=None)
