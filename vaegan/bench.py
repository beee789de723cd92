"""`vaegan bench step`: the training step, side by side with a plain port of Algorithm 1.

The plain port is how Algorithm 1 is usually transcribed (and how the ports on GitHub do
it): a discriminator pass on detached fakes and its update, then a fresh discriminator
forward for the VAE and GAN terms and separate backward passes for the encoder and decoder.
It is here as the yardstick, not used for training.

Reported per variant: GFLOP per image per step (counted by torch's FlopCounterMode, so
independent of the machine) and images per second (median over timed steps after warm-up).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from vaegan.config import Config, load_config
from vaegan.losses import gan_bce, kl_prior, llike_dis_l
from vaegan.model import VAEGAN, reparameterize
from vaegan.step import TrainStep, make_optimizer, precision_context, resolve_precision


class PlainStep:
    """Algorithm 1 transcribed plainly (the yardstick; updates Dis before Enc/Dec's forward)."""

    def __init__(self, model: VAEGAN, cfg: Config):
        self.model, self.cfg = model, cfg
        self.opts = [make_optimizer(n.parameters(), cfg.optim)
                     for n in (model.encoder, model.decoder, model.discriminator)]
        # The same precision as the step it is compared with (bf16 autocast where native).
        self.precision = resolve_precision(cfg.train.precision, model.device)

    def __call__(self, x: torch.Tensor) -> None:
        enc, dec, dis = self.model.encoder, self.model.decoder, self.model.discriminator
        opt_enc, opt_dec, opt_dis = self.opts
        b, latent, gamma = x.shape[0], self.cfg.model.latent_dim, self.cfg.loss.gamma
        amp = lambda: precision_context(self.precision, x.device)
        with amp():
            mu, log_var = enc(x)
            z = reparameterize(mu.float(), log_var.float(), torch.randn(b, latent))
            # the same model as ours: one Dec batch [z; z_p] (batch norm statistics over both)
            x_tilde, x_p = dec(torch.cat([z, torch.randn(b, latent)])).split(b)
            # (1) Update Dis: descend the BCE on x, x~ and x_p (fakes detached)
            logits, _ = dis(torch.cat([x, x_tilde.detach(), x_p.detach()]))
        opt_dis.zero_grad()
        gan_bce(*logits.float().split(b)).backward()
        opt_dis.step()
        # (2) Fresh Dis forward for the VAE and GAN terms; Enc and Dec backward separately
        with amp():
            logits, feats = dis(torch.cat([x, x_tilde, x_p]))
        feats_real, feats_recon, _ = feats.float().split(b)
        ll = llike_dis_l(feats_real.detach(), feats_recon)
        gan = gan_bce(*logits.float().split(b))
        enc_grads = torch.autograd.grad(kl_prior(mu.float(), log_var.float()) + ll, list(enc.parameters()),
                                        retain_graph=True)
        dec_grads = torch.autograd.grad(gamma * ll - gan, list(dec.parameters()))
        for net, grads, opt in ((enc, enc_grads, opt_enc), (dec, dec_grads, opt_dec)):
            for p, g in zip(net.parameters(), grads, strict=True):
                p.grad = g
            opt.step()


def _variant(name: str, cfg: Config, channels_last: bool):
    model = VAEGAN(cfg.model)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    step = TrainStep.for_model(model, cfg) if name == "vaegan" else PlainStep(model, cfg)
    return model, step, fmt


class _FlopCounter:
    """Counts matmul/conv FLOPs of every op run (torch's formulas). torch's FlopCounterMode
    also tracks modules with hooks that break `autograd.grad` on leaves, which the step uses."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                formula = flop_registry.get(func._overloadpacket)
                if formula is not None:
                    counter.total += formula(*args, **kwargs, out_val=out)
                return out

        self.total, self.mode = 0, Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def count_gflop_per_image(cfg: Config, name: str) -> float:
    cfg = copy.deepcopy(cfg)
    cfg.train.precision = "fp32"  # count the same ops whatever the hardware
    _, step, _ = _variant(name, cfg, False)
    m = cfg.model
    x = torch.rand(cfg.data.batch_size, m.channels, m.image_size, m.image_size) * 2 - 1
    with _FlopCounter() as counter:
        step(x)
    return counter.total / cfg.data.batch_size / 1e9


def bench_step(preset: str = "celeba64", overrides: list[str] | None = None, steps: int = 5,
               warmup: int = 2, variants: tuple[str, ...] = ("vaegan", "plain"),
               layouts: tuple[bool, ...] = (False, True)) -> list[dict]:
    """Time each variant x memory layout; returns one dict per combination."""
    cfg = load_config(preset, overrides=overrides or [])
    m = cfg.model
    rows = []
    for name in variants:
        gflop = count_gflop_per_image(cfg, name)
        for channels_last in layouts:
            torch.manual_seed(0)
            model, step, fmt = _variant(name, cfg, channels_last)
            x = (torch.rand(cfg.data.batch_size, m.channels, m.image_size, m.image_size) * 2 - 1
                 ).contiguous(memory_format=fmt)
            times = []
            for i in range(warmup + steps):
                t = time.perf_counter()
                step(x)
                if i >= warmup:
                    times.append(time.perf_counter() - t)
            sec = statistics.median(times)
            precision = step.precision
            rows.append({"step": name, "preset": preset, "batch": cfg.data.batch_size,
                         "channels_last": channels_last, "precision": precision,
                         "gflop_per_image": round(gflop, 2), "seconds_per_step": round(sec, 3),
                         "images_per_s": round(cfg.data.batch_size / sec, 1),
                         "threads": torch.get_num_threads()})
    return rows
