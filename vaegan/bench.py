"""`vaegan bench step`: the training step, side by side with a plain port of Algorithm 1.

The plain port is how Algorithm 1 is usually transcribed (and how the ports on GitHub do
it): a discriminator pass on detached fakes and its update, then a fresh discriminator
forward for the VAE and GAN terms and separate backward passes for the encoder and decoder.
It is here as the yardstick, not used for training.

Reported per variant: GFLOP per image per step (counted with torch's formulas, so
independent of the machine) and images per second (median over timed steps after warm-up,
the variants taking turns step by step so that other jobs on the machine slow them alike);
their product, the GFLOP/s the variant gets out of the device, and that as a share of the
device's measured matrix-multiply rate at the same precision and threads (`share_of_peak`):
a step that does fewer FLOPs but at a lower rate shows it there.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from vaegan.allocator import keep_freed_memory
from vaegan.config import Config, load_config
from vaegan.errors import UserError
from vaegan.losses import gan_bce, kl_prior, llike_dis_l
from vaegan.model import VAEGAN, reparameterize
from vaegan.step import (
    TrainStep,
    decode,
    make_optimizer,
    precision_context,
    resolve_precision,
    set_cuda_backends,
)


class PlainStep:
    """Algorithm 1 transcribed plainly: the yardstick of `vaegan bench step`.

    (1) Dis forward on [x; x~; x_p] with the fakes detached, a backward into Dis's weights,
    and Dis steps; (2) a fresh Dis forward (Dis has changed) and two backward passes, each
    restricted to one network's parameters: Enc's of L_prior + L_llike, Dec's of
    gamma * L_llike - L_GAN. That is the fewest traversals this order allows (the two cannot
    be one backward: Enc's and Dec's objectives differ by terms that reach both through the
    decoder). Per image at celeba64: Dis 2 forwards, 1 weight pass, 2 input-gradient passes;
    Dec 1 forward, 1 weight pass, 1 input-gradient pass; Enc 1 of each: 23.4 GFLOP. The model
    and batching are the step's (Dec's per loss.decoder_bn, one Dis batch [x; x~; x_p]), so batch
    norm normalises the same samples together; tests/test_bench_step.py checks its gradients.
    It always runs recipe=paper with the minimax decoder objective (celeba64's settings): with
    loss.generator=nonsaturating (mnist32) the step does one more Dis input-gradient pass than
    this and the comparison is not like for like.
    """

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
            z = reparameterize(mu.float(), log_var.float(), torch.randn(b, latent, device=x.device))
            z_p = torch.randn(b, latent, device=x.device)
            x_tilde, x_p = decode(dec, torch.cat([z, z_p]), b, self.cfg.loss.decoder_bn).split(b)
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


def resolve_bench_device(device: str) -> torch.device:
    """auto: the first CUDA device where there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this machine has no CUDA device; use cpu or auto")
    return torch.device(device)


def matmul_peak_gflops(precision: str, device: torch.device, n: int | None = None, repeats: int = 5) -> float:
    """The device's measured matrix-multiply rate in GFLOP/s at `precision` ("bf16" or "fp32";
    fp32 without TF32, as the step runs it), at the threads set now: the best of `repeats`
    n x n products, large enough (CPU 2048, CUDA 8192) to reach the GEMM library's plateau.
    What the step's convolutions and linears could get at best: its yardstick."""
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    if precision not in dtypes:
        raise UserError(f"precision {precision!r}: the matmul peak is measured for {sorted(dtypes)}")
    n = n or (8192 if device.type == "cuda" else 2048)
    a, b = (torch.randn(n, n, device=device, dtype=dtypes[precision]) for _ in range(2))
    a @ b  # the first call picks kernels and allocates
    if device.type == "cuda":  # an idle GPU clocks down: half a second of products brings it up
        synchronize(device)
        t = time.perf_counter()
        while time.perf_counter() - t < 0.5:
            a @ b
            synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a wall-clock time covers it (CUDA runs async)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _variant(name: str, cfg: Config, channels_last: bool, compiled: bool = False,
             device: torch.device | str = "cpu"):
    model = VAEGAN(cfg.model)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    if name == "vaegan":
        cfg = copy.deepcopy(cfg)
        cfg.train.compile = compiled
        return model, TrainStep.for_model(model, cfg), fmt
    return model, PlainStep(model, cfg), fmt


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


def check_benchable(cfg: Config) -> Config:
    """The benchmarks time the paper's step, whose inputs are images alone."""
    if cfg.loss.attribute_weight or cfg.model.dis_attributes:
        raise UserError(f"loss.attribute_weight={cfg.loss.attribute_weight:g}: the benchmarks time the "
                        "step without Dis's attribute head (it needs labelled batches); leave "
                        "loss.attribute_weight and model.dis_attributes at 0 here")
    return cfg


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
               layouts: tuple[bool, ...] = (False, True), device: str = "auto",
               peak_size: int | None = None) -> list[dict]:
    """Time each variant x memory layout (x eager/compiled for the step when
    train.compile=true); returns one dict per combination.

    The combinations take turns, one step each, in an order reversed every round, so a
    machine whose speed drifts (other jobs) slows them alike; each row is the median of its
    timed steps. `vs_plain` is the row's speed over the plain port's at the same layout (the
    median over rounds of the two step times' ratio); `noise` is the interquartile range of
    the row's step times over their median. `gflops` is the row's FLOP rate, `share_of_peak`
    that over `matmul_peak_gflops` (the best of a measurement before and after the steps,
    `peak_size`: its n; None: the device's default)."""
    cfg = check_benchable(load_config(preset, overrides=overrides or []))
    dev = resolve_bench_device(device)
    keep_freed_memory()  # as the training workers do
    precision = resolve_precision(cfg.train.precision, dev)
    set_cuda_backends(dev, precision)  # as training does
    m = cfg.model
    combos = [(name, channels_last, compiled) for name in variants for channels_last in layouts
              for compiled in ((False, True) if name == "vaegan" and cfg.train.compile
                               else (False,))]
    gflop = {name: count_gflop_per_image(cfg, name) for name in variants}
    peak = matmul_peak_gflops(precision, dev, peak_size)  # and again after: these machines drift
    runs = []
    for name, channels_last, compiled in combos:
        torch.manual_seed(0)
        _, step, fmt = _variant(name, cfg, channels_last, compiled, dev)
        x = (torch.rand(cfg.data.batch_size, m.channels, m.image_size, m.image_size, device=dev) * 2 - 1
             ).contiguous(memory_format=fmt)
        t = time.perf_counter()
        step(x)  # the first step also compiles, when compiled
        synchronize(dev)
        runs.append({"step": step, "x": x, "first": time.perf_counter() - t, "times": []})
    for _ in range(warmup):
        for r in runs:
            r["step"](r["x"])
    for i in range(steps):
        for r in runs if i % 2 == 0 else runs[::-1]:
            synchronize(dev)
            t = time.perf_counter()
            r["step"](r["x"])
            synchronize(dev)
            r["times"].append(time.perf_counter() - t)
    peak = max(peak, matmul_peak_gflops(precision, dev, peak_size))
    rows = []
    for (name, channels_last, compiled), r in zip(combos, runs, strict=True):
        sec = statistics.median(r["times"])
        rate = gflop[name] * cfg.data.batch_size / sec  # GFLOP/s
        q = statistics.quantiles(r["times"], n=4) if len(r["times"]) > 1 else [sec, sec, sec]
        row = {"step": name, "preset": preset, "batch": cfg.data.batch_size,
               "channels_last": channels_last, "precision": r["step"].precision,
               "gflop_per_image": round(gflop[name], 2), "seconds_per_step": round(sec, 3),
               "images_per_s": round(cfg.data.batch_size / sec, 1),
               "gflops": round(rate, 1), "share_of_peak": round(rate / peak, 3),
               "matmul_peak_gflops": round(peak, 1),
               "noise": round((q[2] - q[0]) / sec, 3), "threads": torch.get_num_threads(),
               "device": str(dev)}
        if cfg.train.compile:
            row.update(compiled=compiled, first_step_s=round(r["first"], 1))
        rows.append(row)
    for row, r in zip(rows, runs, strict=True):
        plain = [p for c, p in zip(combos, runs, strict=True)
                 if c[0] == "plain" and c[1] == row["channels_last"]]
        if plain:  # the median of same-round ratios: a burst of other work hits both
            row["vs_plain"] = round(statistics.median(
                p / max(t, 1e-9) for p, t in zip(plain[0]["times"], r["times"], strict=True)), 3)
    return rows
