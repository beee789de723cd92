"""The step benchmark's yardstick (the plain port) must itself be Algorithm 1: from the same
weights and noise, its Dis update equals ours; and the FLOP count shows the saving."""

import copy

import pytest
import torch

from vaegan.bench import PlainStep, count_gflop_per_image
from vaegan.cli import main
from vaegan.model import VAEGAN
from vaegan.step import TrainStep


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_plain_port_updates_dis_like_the_efficient_step(debug_cfg, precision):
    """In either precision: the yardstick runs at the precision of the step it is timed
    against (a bf16 step against an fp32 port would flatter the step on AMX CPUs)."""
    cfg = copy.deepcopy(debug_cfg)
    cfg.train.precision = precision
    model = VAEGAN(cfg.model)
    other = copy.deepcopy(model)
    x = torch.rand(8, 1, 32, 32) * 2 - 1
    torch.manual_seed(3)
    plain = PlainStep(model, cfg)
    plain(x)  # draws eps then z_p with the global generator
    torch.manual_seed(3)
    noise = (torch.randn(8, 8), torch.randn(8, 8))
    ours = TrainStep.for_model(other, cfg)
    ours(x, noise)
    assert plain.precision == ours.precision == precision
    tol = {"fp32": dict(rtol=1e-4, atol=1e-6), "bf16": dict(rtol=2e-2, atol=2e-4)}[precision]
    for a, b in zip(model.discriminator.parameters(), other.discriminator.parameters(), strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_efficient_step_counts_fewer_flops(debug_cfg):
    ours = count_gflop_per_image(debug_cfg, "vaegan")
    plain = count_gflop_per_image(debug_cfg, "plain")
    assert 0 < ours < plain


def test_cli_bench_step_prints_json(capsys):
    assert main(["bench", "step", "--preset", "debug", "--steps", "1", "--warmup", "0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all('"images_per_s"' in line for line in lines)
