"""A sweep's models side by side (vaegan.compare): grouping over seeds and the table. The real
sweep with --compare runs in tests/test_tune.py."""

from vaegan.compare import Scored, format_table, group, label
from vaegan.evaluate import EvalMetrics


def metrics(fid: float, recognisable: float | None = 0.5) -> EvalMetrics:
    return EvalMetrics(fid_samples=fid, fid_recon=2.0, kid_samples=0.004, kid_recon=0.001,
                       sharpness_samples=0.9, sharpness_recon=0.8, mse_recon=0.01, ssim_recon=0.7,
                       dis_l_recon=3.0, recognisable=recognisable, recognisable_p50=0.9,
                       recognisable_real=0.93, n_images=500)


def scored(mode: str, seed: int, fid: float, **kw) -> Scored:
    return Scored(f"t-{mode}-{seed}", {"loss.mode": mode, "train.seed": seed}, 100 + seed,
                  metrics(fid, **kw), model=None, mode=mode)


def test_seeds_of_one_configuration_are_one_row_with_mean_and_half_range():
    configs = group([scored("gan", 1, 30.0), scored("vae", 0, 50.0), scored("gan", 0, 20.0),
                     scored("vae", 1, 70.0)])
    assert [c.label for c in configs] == ["gan", "vae"]  # in order of first appearance
    assert [t.params["train.seed"] for t in configs[0].trials] == [0, 1]
    assert configs[0].mean("fid_samples") == 25.0 and configs[1].spread("fid_samples") == 20.0
    lines = format_table(configs).splitlines()
    assert lines[0].startswith("| model | seeds | steps | FID samples | FID recon | KID samples |")
    assert lines[2].startswith("| gan | 2 | 100/101 | 25.0 ± 5.0 | 2.000 ± 0.000 | 0.004 ± 0.000 |")
    assert lines[3].startswith("| vae | 2 | 100/101 | 60.0 ± 10.0 |")
    assert "| 1234 |" in format_table(group([scored("gan", 0, 1234.4)]))  # ~3 significant digits


def test_a_metric_some_model_lacks_is_na_and_a_column_none_has_is_left_out():
    one_seed = group([scored("vae", 0, 50.0, recognisable=None), scored("gan", 0, 20.0)])
    table = format_table(one_seed)
    assert "recognised p>0.9" in table and "| n/a |" in table and "±" not in table
    none = format_table(group([scored("vae", 0, 50.0, recognisable=None)]))
    assert "recognised" not in none


def test_labels_name_the_values_and_the_keys_when_several_are_searched():
    assert label({"loss.mode": "gan", "train.seed": 3}) == "gan"
    assert label({"loss.mode": "gan", "loss.gamma": 0.1, "train.seed": 0}) == "mode=gan, gamma=0.1"
    assert label({"train.seed": 0}) == "(base config)"


def test_the_figure_adds_the_latent_mixture_samples_of_the_models_that_have_one():
    import numpy as np
    import torch

    from vaegan.compare import FIGURE_INPUTS, FIGURE_SEED, ConfigRow, figure
    from vaegan.config import load_config
    from vaegan.latent import fit_mixture
    from vaegan.model import VAEGAN

    real = torch.rand(40, 1, 32, 32) * 2 - 1
    mixed = VAEGAN(load_config("debug", overrides=["model.latent_mixture=2"]).model)
    fit_mixture(mixed, real)
    rows = [ConfigRow("vaegan", [Scored("a", {}, 1, metrics(1.0), model=mixed, mode="vaegan")]),
            ConfigRow("gan", [Scored("b", {}, 1, metrics(1.0), model=VAEGAN(load_config("debug").model),
                                     mode="gan")])]
    axes = figure(rows, real).axes
    assert [a.get_title(loc="left") for a in axes] == ["input", "vaegan", "gan"]
    grid = axes[1].get_images()[0].get_array()
    assert grid.shape == (34 + 2, 3 * FIGURE_INPUTS * 34 + 2)  # 32-px cells, 2-px padding; 3 blocks
    # the third block: the mixture's samples for the seed; white where a model has no mixture
    with torch.no_grad():
        gen = torch.Generator().manual_seed(FIGURE_SEED)
        mixture = mixed.eval().sample(FIGURE_INPUTS, gen, latent="mixture")
    first = ((mixture[0, 0] + 1) / 2).clamp(0, 1).mul(255).round().byte().numpy()
    cell = 2 * FIGURE_INPUTS * 34 + 2
    assert np.array_equal(np.asarray(grid[2:34, cell:cell + 32]), first)
    assert (np.asarray(axes[2].get_images()[0].get_array())[2:34, cell:] == 255).all()
    # without any mixture: the two blocks as before
    two = figure(rows[1:], real).axes[1].get_images()[0].get_array()
    assert two.shape == (36, 2 * FIGURE_INPUTS * 34 + 2)
