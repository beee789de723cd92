from dataclasses import replace

import pytest
import torch

from vaegan.config import ModelConfig, load_config
from vaegan.model import VAEGAN, dis_l_shape, param_count


@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_every_size_and_channel_count(size, channels):
    cfg = ModelConfig(image_size=size, channels=channels, latent_dim=8, width=0.125,
                      enc_fc=32, dis_fc=16)
    model = VAEGAN(cfg)
    x = torch.rand(2, channels, size, size) * 2 - 1
    mu, log_var = model.encode(x)
    assert mu.shape == log_var.shape == (2, 8)
    out = model.decode(mu)
    assert out.shape == x.shape and out.abs().max() <= 1  # tanh range
    logit, feats = model.discriminator(x)
    assert logit.shape == (2,)
    assert feats.shape == (2, *dis_l_shape(cfg))
    assert model.sample(3).shape == (3, channels, size, size)
    assert model.reconstruct(x).shape == x.shape


def test_dis_l_is_the_paper_layer_at_64():
    """Table 1: Dis_l is the 4th conv's output, 256 x 8 x 8, before its BN and ReLU."""
    cfg = load_config("celeba64").model
    assert dis_l_shape(cfg) == (256, 8, 8)
    dis = VAEGAN(cfg).discriminator
    assert dis.dis_layer == 4
    x = torch.randn(2, 3, 64, 64)
    _, feats = dis(x)
    assert (feats < 0).any(), "taken after the ReLU: Dis_l must be pre-activation"
    torch.testing.assert_close(dis.features(x), feats)


def test_selectable_dis_layer():
    cfg = ModelConfig(image_size=32, channels=1, latent_dim=4, width=0.25, dis_layer=2)
    _, feats = VAEGAN(cfg).discriminator(torch.randn(2, 1, 32, 32))
    assert feats.shape == (2, *dis_l_shape(cfg)) == (2, 32, 16, 16)


def test_the_attribute_head_shares_dis_and_leaves_its_logit_alone():
    """model.dis_attributes: a second head on Dis's hidden FC; the GAN logit and Dis_l are
    those of the same Dis without the head."""
    cfg = ModelConfig(image_size=32, channels=1, latent_dim=4, width=0.25, dis_attributes=5)
    dis = VAEGAN(cfg).discriminator.eval()
    x = torch.randn(3, 1, 32, 32)
    logit, feats, attrs = dis(x, with_attributes=True)
    assert attrs.shape == (3, 5)
    plain_logit, plain_feats = dis(x)
    torch.testing.assert_close(logit, plain_logit)
    torch.testing.assert_close(feats, plain_feats)
    with pytest.raises(ValueError, match="no attribute head"):
        VAEGAN(ModelConfig(image_size=32, channels=1, latent_dim=4)).discriminator(x, with_attributes=True)


def test_table1_parameter_counts():
    """Counted by hand from Table 1 (5x5 convs with bias, BN scale+shift): guards the
    numbers the README states."""
    def conv(cin, cout):
        return cin * cout * 25 + cout

    def bn(c):
        return 2 * c

    def fc(i, o):
        return i * o + o

    enc = (conv(3, 64) + bn(64) + conv(64, 128) + bn(128) + conv(128, 256) + bn(256)
           + fc(256 * 64, 2048) + bn(2048) + 2 * fc(2048, 128))
    dec = (fc(128, 256 * 64) + bn(256 * 64) + conv(256, 256) + bn(256) + conv(256, 128)
           + bn(128) + conv(128, 32) + bn(32) + conv(32, 3))
    dis = (conv(3, 32) + conv(32, 128) + bn(128) + conv(128, 256) + bn(256) + conv(256, 256)
           + bn(256) + fc(256 * 64, 512) + bn(512) + fc(512, 1))
    model = VAEGAN(load_config("celeba64").model)
    assert param_count(model.encoder) == enc == 35_115_264
    assert param_count(model.decoder) == dec == 4_709_955
    assert param_count(model.discriminator) == dis == 10_955_009


def test_bad_image_shape_is_named():
    model = VAEGAN(ModelConfig(image_size=32, channels=1, latent_dim=4, width=0.125))
    with pytest.raises(ValueError, match=r"\(B, 1, 32, 32\); got \(2, 3, 32, 32\)"):
        model.encode(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        model.decode(torch.zeros(2, 5))


def test_a_net_built_from_weights_holds_them_and_nothing_else():
    from vaegan.artifact import net_from_weights

    cfg = replace(load_config("debug").model, latent_mixture=3)
    trained = VAEGAN(cfg)
    trained.latent_mixture.fitted.fill_(True)  # buffers travel too, not only parameters
    net = net_from_weights(cfg, trained.state_dict())
    assert {t.device.type for t in [*net.parameters(), *net.buffers()]} == {"cpu"}  # nothing left on meta
    for (k, a), b in zip(trained.state_dict().items(), net.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=k)
    x = torch.rand(2, cfg.channels, cfg.image_size, cfg.image_size) * 2 - 1
    torch.testing.assert_close(net.eval().reconstruct(x), trained.eval().reconstruct(x))
    partial = {k: v for k, v in trained.state_dict().items() if not k.startswith("latent_mixture.")}
    with pytest.raises(RuntimeError, match="Missing key"):  # strict: a meta tensor never survives
        net_from_weights(cfg, partial)
