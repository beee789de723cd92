"""The plain port in `vaegan bench step` is the yardstick the step's speed is measured
against: it must be Algorithm 1 transcribed plainly (Dis updated first on detached fakes,
then a fresh Dis forward for the Enc and Dec gradients), pass for pass, nothing else."""

import copy

import pytest
import torch

from vaegan.bench import PlainStep, bench_step
from vaegan.config import load_config
from vaegan.errors import UserError
from vaegan.losses import gan_bce, kl_prior, llike_dis_l
from vaegan.model import VAEGAN, reparameterize
from vaegan.step import make_optimizer


def test_plain_port_gradients_are_the_plain_transcription(debug_cfg):
    """Dis: grad L_GAN on detached fakes; then, after Dis's update, Enc: grad (L_prior +
    L_llike) and Dec: grad (gamma L_llike - L_GAN) on a fresh full graph."""
    debug_cfg.loss.gamma = 0.3
    model = VAEGAN(debug_cfg.model)
    ref = copy.deepcopy(model)
    x = torch.rand(8, 1, 32, 32) * 2 - 1
    torch.manual_seed(3)
    PlainStep(model, debug_cfg)(x)
    torch.manual_seed(3)
    eps, z_p = torch.randn(8, 8), torch.randn(8, 8)

    enc, dec, dis = ref.encoder, ref.decoder, ref.discriminator
    mu, log_var = enc(x)
    z = reparameterize(mu, log_var, eps)
    fake = dec(torch.cat([z, z_p]))
    logits, _ = dis(torch.cat([x, fake.detach()]))
    expected = {"discriminator": torch.autograd.grad(gan_bce(*logits.split(8)),
                                                     list(dis.parameters()))}
    opt = make_optimizer(dis.parameters(), debug_cfg.optim)
    for p, g in zip(dis.parameters(), expected["discriminator"], strict=True):
        p.grad = g
    opt.step()
    logits, feats = dis(torch.cat([x, fake]))
    ll = llike_dis_l(feats[:8].detach(), feats[8:16])
    gan = gan_bce(*logits.split(8))
    expected["encoder"] = torch.autograd.grad(kl_prior(mu, log_var) + ll,
                                              list(enc.parameters()), retain_graph=True)
    expected["decoder"] = torch.autograd.grad(0.3 * ll - gan, list(dec.parameters()))
    for name, grads in expected.items():
        for i, (p, g) in enumerate(zip(getattr(model, name).parameters(), grads, strict=True)):
            torch.testing.assert_close(p.grad, g, rtol=2e-4, atol=2e-6,
                                       msg=lambda m, i=i, name=name: f"{name} param {i}: {m}")


def test_the_benchmarks_refuse_the_attribute_head():
    """They time the paper's step on unlabelled batches."""
    with pytest.raises(UserError, match=r"loss.attribute_weight=1: the benchmarks time the step without"):
        bench_step("debug", ["loss.attribute_weight=1"])


def test_bench_step_alternates_and_reports_compiled_beside_eager(monkeypatch):
    """train.compile=true adds a compiled row for the step beside the eager one (here with a
    stand-in for torch.compile: what is compiled is tested in test_compile)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    rows = bench_step("debug", ["train.compile=true"], steps=2, warmup=0, layouts=(True,), peak_size=128)
    assert [(r["step"], r.get("compiled")) for r in rows] == [
        ("vaegan", False), ("vaegan", True), ("plain", False)]
    assert all(r["vs_plain"] > 0 and r["noise"] >= 0 for r in rows)
    assert rows[-1]["vs_plain"] == 1.0


def test_bench_step_gives_each_rows_flop_rate_and_its_share_of_the_matmul_peak(monkeypatch):
    """gflops = the variant's GFLOP per image x its images/s; share_of_peak = that over the
    device's measured matmul rate at the step's precision, the best of a look before and after."""
    import vaegan.bench as bench

    looks, asked = iter([800.0, 1000.0]), []

    def peak(precision, device, n=None, repeats=5):
        asked.append((precision, device.type, n))
        return next(looks)

    monkeypatch.setattr(bench, "matmul_peak_gflops", peak)
    rows = bench_step("debug", ["train.precision=fp32"], steps=2, warmup=0, layouts=(True,), peak_size=64)
    assert asked == [("fp32", "cpu", 64)] * 2
    for r in rows:
        per_image = bench.count_gflop_per_image(load_config("debug"), r["step"])
        rate = per_image * r["images_per_s"]
        assert r["matmul_peak_gflops"] == 1000.0
        # both figures are rounded to 0.1: gflops by up to 0.05, images/s by up to 0.05 images
        assert r["gflops"] == pytest.approx(rate, rel=0.01, abs=0.05 + 0.05 * per_image + 1e-9)
        assert r["share_of_peak"] == pytest.approx(r["gflops"] / 1000.0, abs=1e-3)


def test_the_matmul_peak_is_a_rate_and_refuses_an_unknown_precision():
    from vaegan.bench import matmul_peak_gflops

    assert 0 < matmul_peak_gflops("fp32", torch.device("cpu"), n=128, repeats=2) < float("inf")
    refused = r"precision 'fp16': the matmul peak is measured for \['bf16', 'fp32'\]"
    with pytest.raises(UserError, match=refused):
        matmul_peak_gflops("fp16", torch.device("cpu"))
