"""VA-VAE: shapes, official key layout, losses, training signal."""

import pytest
import torch

from latentforge.registry import TOKENIZERS
from latentforge.tokenizers import losses
from latentforge.tokenizers.vavae import CONFIGS, VAVAE, VAVAEConfig, build_vavae


def tiny(vfm=None, **kw):
    torch.manual_seed(0)
    return VAVAE(CONFIGS["tiny"], VAVAEConfig(config="tiny", vfm=None, **kw), vfm)


@pytest.mark.parametrize("res", [64, 256])
def test_round_trip_shapes(res):
    model = tiny().eval()
    x = torch.rand(2, 3, res, res) * 2 - 1
    z = model.encode(x)
    assert z.shape == (2, 4, res // 4, res // 4) == (2, *model.latent_shape(res))
    assert model.decode(z).shape == x.shape


def test_published_f16d32_size_and_keys():
    with torch.device("meta"):
        model = VAVAE(CONFIGS["f16d32"], VAVAEConfig(config="f16d32", vfm=None))
    total = sum(p.numel() for p in model.parameters())
    enc = sum(
        p.numel() for n, p in model.named_parameters() if n.startswith(("encoder.", "quant_conv."))
    )
    assert total / 1e6 == pytest.approx(69.84, abs=0.01) and enc / 1e6 == pytest.approx(
        28.42, abs=0.01
    )
    keys = set(model.state_dict())
    for k in (
        "encoder.conv_in.weight",
        "encoder.down.0.block.1.conv2.weight",
        "encoder.down.2.block.0.nin_shortcut.weight",
        "encoder.down.3.downsample.conv.weight",
        "encoder.down.4.attn.1.proj_out.weight",
        "encoder.mid.attn_1.q.weight",
        "encoder.mid.block_2.norm2.bias",
        "encoder.conv_out.weight",
        "quant_conv.weight",
        "post_quant_conv.bias",
        "decoder.up.4.attn.2.k.weight",
        "decoder.up.1.upsample.conv.weight",
        "decoder.up.0.block.2.conv1.weight",
        "decoder.conv_out.bias",
    ):
        assert k in keys, k
    assert model.latent_shape(256) == (32, 16, 16)


def test_latent_channels_override_and_registry():
    cfg = VAVAEConfig(config="tiny", latent_channels=16, vfm=None)
    model = TOKENIZERS.build("vavae", cfg, 32)
    assert model.latent_shape(32) == (16, 8, 8)
    with pytest.raises(ValueError, match="divisible"):
        build_vavae(cfg, 30)


class FakeVFM(torch.nn.Module):
    """Deterministic stand-in for a VFM: fixed random conv features on an 8x8 grid."""

    embed_dim = 6

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 4, stride=4).requires_grad_(False)

    def forward(self, images):
        from latentforge.tokenizers.vfm import VFMOutput

        return VFMOutput([self.conv(images)], None)


def test_vfm_is_not_in_state_dict_but_moves_with_the_model():
    vfm = FakeVFM()
    model = tiny(vfm=vfm, vf_weight=0.5)
    assert not any(k.startswith(("_vfm", "vfm")) for k in model.state_dict())
    assert "linear_proj.weight" in model.state_dict()
    assert all(not n.startswith("_vfm") for n, _ in model.named_parameters())
    model.to(torch.float64)
    assert vfm.conv.weight.dtype == torch.float64


def test_a_copy_has_its_own_weights_and_shares_the_frozen_vfm():
    import copy

    model = tiny(vfm=FakeVFM(), vf_weight=0.5)
    ema = copy.deepcopy(model)
    assert ema.vfm is model.vfm  # an EMA copy does not duplicate the loss network
    assert ema.linear_proj.weight is not model.linear_proj.weight
    ema.encoder.conv_in.weight.data.add_(1.0)
    assert not torch.equal(ema.encoder.conv_in.weight, model.encoder.conv_in.weight)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(copy.deepcopy(model).decode(model.encode(x)), model.decode(model.encode(x)))


def test_decoder_noise_perturbs_only_the_decoder_input(monkeypatch):
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    seen = {}

    def run(noise):
        model = tiny(decoder_noise=noise, sample_posterior=False).train()
        decode = model.decode

        def spy(z):
            seen[noise] = z
            return decode(z)

        monkeypatch.setattr(model, "decode", spy)
        torch.manual_seed(1)
        return model, model.loss(x, 0)

    model, plain = run(0.0)
    _, noisy = run(0.5)
    mean = model.moments(x)[0]
    assert torch.equal(seen[0.0], mean)  # off: the decoder sees the posterior mean
    delta = seen[0.5] - mean
    assert delta.abs().max() > 0 and not torch.equal(noisy["recon"], plain["recon"])
    # per-image scale times the per-channel std of the batch: bounded, not exploding
    assert delta.std() < 3 * 0.5 * mean.std()


def test_loss_parts_and_adaptive_weight():
    model = tiny(vfm=FakeVFM(), vf_weight=0.5).train()
    out = model.loss(torch.rand(4, 3, 32, 32) * 2 - 1, nimg=0)
    assert {"loss", "recon", "kl", "vf", "vf_weight_eff"} <= set(out)
    assert out["loss"].requires_grad and not out["vf"].requires_grad
    w = out["vf_weight_eff"].item()
    assert 0 < w < float("inf")


def adaptive(main, other, last, cap):
    """||grad_last main|| / (||grad_last other|| + 1e-4), clamped to [0, cap] (Esser et al.
    2021, Eq. 7; VA-VAE's VF weight), from the gradients taken here."""
    g_main = torch.autograd.grad(main, last, retain_graph=True)[0]
    g_other = torch.autograd.grad(other, last, retain_graph=True)[0]
    return min(g_main.norm().item() / (g_other.norm().item() + 1e-4), cap)


def test_loss_is_recon_plus_weighted_kl_plus_adaptive_vf():
    """VA-VAE's objective (Yao et al. 2025, Sec. 3): L = L_rec + w_kl L_kl + w_vf w_ad L_vf,
    w_ad = ||grad L_rec|| / ||grad L_vf|| at the encoder's last layer (capped at 1e8 in LDM's
    per-image-sum units, i.e. 1e8 / (3 H W) here)."""
    vfm = FakeVFM()
    model = tiny(vfm=vfm, vf_weight=0.5, kl_weight=0.1, sample_posterior=False).train()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = model.loss(x, nimg=0)
    mean, logvar = model.moments(x)  # deterministic: z is the posterior mean
    recon = (model.decode(mean) - x).abs().mean()
    kl = (0.5 * (mean**2 + logvar.exp() - 1 - logvar)).sum(dim=(1, 2, 3)).mean() / (3 * 16 * 16)
    vf = losses.vf_loss(model.linear_proj(mean), vfm(x).patch[-1], 0.5, 0.25)
    w = 0.5 * adaptive(recon, vf, model.encoder.conv_out.weight, 1e8 / (3 * 16 * 16))
    assert out["vf_weight_eff"].item() == pytest.approx(w, rel=1e-4)
    assert out["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert out["vf"].item() == pytest.approx(vf.item(), rel=1e-5)
    expected = recon + 0.1 * kl + w * vf
    assert w * vf.item() > 1e-3 * expected.item()  # the VF term counts in the total
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_loss_adds_the_adaptive_gan_generator_term():
    """With the discriminator on: + w_disc w_ad L_G, L_G = -mean D(x_hat) (hinge, generator
    side), w_ad = ||grad L_rec|| / ||grad L_G|| at the decoder's last layer (Esser et al. 2021,
    Eq. 7), capped at disc_max_weight / (3 H W)."""
    model = tiny(disc_weight=0.5, disc_max_weight=1e6, disc_layers=2, disc_channels=8, kl_weight=0.1,
                 sample_posterior=False)  # fmt: skip
    model.train()
    disc = model.make_discriminator()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = model.loss(x, nimg=0, discriminator=disc)
    mean, logvar = model.moments(x)
    x_hat = model.decode(mean)
    recon = (x_hat - x).abs().mean()
    kl = losses.kl_loss(mean, logvar, 3 * 16 * 16)
    g = -disc(x_hat).mean()
    w = 0.5 * adaptive(recon, g, model.decoder.conv_out.weight, 1e6 / (3 * 16 * 16))
    assert out["g_weight_eff"].item() == pytest.approx(w, rel=1e-4)
    assert out["g_loss"].item() == pytest.approx(g.item(), rel=1e-5)
    expected = recon + 0.1 * kl + w * g
    assert abs(w * g.item()) > 1e-3 * abs(expected.item())
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_vf_loss_zero_beyond_margins_for_identical_features():
    f = torch.randn(2, 6, 4, 4)
    assert losses.vf_loss(f.clone(), f, 0.0, 0.0).item() == pytest.approx(0.0, abs=1e-6)
    # features scaled (same directions) are also aligned under cosine terms
    assert losses.vf_loss(3 * f, f, 0.0, 0.0).item() == pytest.approx(0.0, abs=1e-6)


def test_vf_loss_known_values():
    z = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1).repeat(1, 1, 1, 2)  # two positions, both e1
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)  # positions e1 and e2
    # cosine term: position 0 cos=1 -> 0, position 1 cos=0 -> relu(1 - m - 0)
    assert losses.marginal_cos_loss(z, f, 0.0).item() == pytest.approx(0.5)
    assert losses.marginal_cos_loss(z, f, 0.5).item() == pytest.approx(0.25)
    # distance matrices: z gives all ones, f gives identity -> off-diagonal |1 - 0| = 1
    assert losses.marginal_distmat_loss(z, f, 0.0).item() == pytest.approx(0.5)
    assert losses.marginal_distmat_loss(z, f, 0.25).item() == pytest.approx(0.375)


def test_vf_loss_resizes_latent_grid():
    z, f = torch.randn(1, 6, 4, 4), torch.randn(1, 6, 8, 8)
    assert torch.isfinite(losses.vf_loss(z, f, 0.5, 0.25))


def test_adaptive_weight_ratio():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    a, b = (w**2).sum(), 10 * w.sum()
    # |grad a| = |2w| = sqrt(20); |grad b| = 10 sqrt(2)
    expected = (20**0.5) / (10 * 2**0.5 + 1e-4)
    assert losses.adaptive_weight(a, b, w).item() == pytest.approx(expected, rel=1e-5)


def test_kl_is_zero_for_standard_normal():
    assert (
        losses.kl_loss(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8), 3 * 32 * 32).item() == 0.0
    )


def test_kl_matches_the_gaussian_closed_form():
    """KL(N(mu, exp(logvar)) || N(0, 1)) summed over each image's latent elements, averaged
    over images, divided by the image's 3 H W values; here by torch.distributions."""
    from torch.distributions import Normal, kl_divergence

    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    logvar = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    kl = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0))  # per element
    expected = kl.sum(dim=(1, 2, 3)).mean() / (3 * 8 * 8)
    assert losses.kl_loss(mean, logvar, 3 * 8 * 8).item() == pytest.approx(
        expected.item(), rel=1e-9
    )
    # one latent element: 0.5 (mu^2 + var - 1 - log var) = 0.5 (4 + e - 1 - 1)
    one = losses.kl_loss(torch.tensor([[2.0]]), torch.tensor([[1.0]]), 1).item()
    assert one == pytest.approx(0.5 * (2 + torch.e), rel=1e-6)


def test_few_steps_lower_the_loss():
    from latentforge.shapes import render_shapes

    model = tiny().train()
    x = torch.from_numpy(render_shapes(range(8), 32)[0]).permute(0, 3, 1, 2).float() / 127.5 - 1
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        out = model.loss(x, 0)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else out["recon"].item()
    assert out["recon"].item() < 0.8 * first


# --------------------------------------------------------------------------- GAN, perceptual


def test_patchgan_shapes_keys_and_init():
    d = losses.NLayerDiscriminator(3, channels=8, layers=3)
    # three stride-2 convolutions, two 4x4 stride-1 ones: 256 -> 128 -> 64 -> 32 -> 31 -> 30
    assert d(torch.randn(2, 3, 256, 256)).shape == (2, 1, 30, 30)
    assert d(torch.randn(1, 3, 32, 32)).shape == (1, 1, 2, 2)
    # the layout of LDM / VA-VAE checkpoints' loss.discriminator.main.{i}
    keys = set(d.state_dict())
    assert {"main.0.weight", "main.0.bias", "main.2.weight", "main.3.running_mean"} <= keys
    assert {"main.11.weight", "main.11.bias"} <= keys and "main.2.bias" not in keys
    assert d.main[8].weight.shape == (64, 32, 4, 4)  # widths 8 -> 16 -> 32 -> 64 -> 1
    assert abs(d.main[0].weight.std().item() - 0.02) < 0.01
    shallow = losses.NLayerDiscriminator(3, channels=8, layers=1)
    assert shallow(torch.randn(1, 3, 32, 32)).shape == (1, 1, 14, 14)


def test_hinge_losses_known_values():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # D: (mean(relu(1 - [2, .5])) + mean(relu(1 + [-2, 0]))) / 2 = (0.25 + 0.5) / 2
    assert losses.hinge_d_loss(real, fake).item() == pytest.approx(0.375)
    assert losses.hinge_g_loss(fake).item() == pytest.approx(1.0)


def test_gan_terms_switch_on_at_disc_start():
    model = tiny(disc_weight=0.5, disc_start=64).train()
    disc = model.make_discriminator()
    assert tiny().make_discriminator() is None  # disc_weight 0: no GAN (the default)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    before = model.loss(x, nimg=63, discriminator=disc)
    assert not model.gan_active(63) and "g_loss" not in before and "fake" not in before
    after = model.loss(x, nimg=64, discriminator=disc)
    assert model.gan_active(64) and {"g_loss", "g_weight_eff", "fake"} <= set(after)
    w = after["g_weight_eff"].item()
    assert 0 < w <= 0.5 * 1e4 and after["fake"].shape == x.shape
    assert not after["fake"].requires_grad and after["loss"].requires_grad
    d = model.discriminator_loss(disc, x, after["fake"])
    assert d["loss"].requires_grad and d["d_loss"].item() >= 0
    d["loss"].backward()
    assert disc.main[0].weight.grad is not None
    assert all(p.grad is None for p in model.parameters())  # fakes are detached


def test_adaptive_weight_caps_are_in_ldms_per_image_units():
    # LDM clamps ||grad nll_sum|| / ||grad g|| at 1e4 with its loss summed over the image's
    # 3 H W values; ours is their mean, so the same cap is 1e4 / (3 H W) here
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    for cap in (1e4, 1.0):
        model = tiny(disc_weight=0.5, disc_max_weight=cap).train()
        w = model.loss(x, nimg=0, discriminator=model.make_discriminator())["g_weight_eff"]
        assert 0 < w.item() <= 0.5 * cap / (3 * 32 * 32) * (1 + 1e-6)
    assert w.item() == pytest.approx(0.5 / (3 * 32 * 32))  # cap 1: it binds


def test_discriminator_loads_official_layout_and_ours(tmp_path):
    from safetensors.torch import save_file

    from latentforge.tokenizers.vavae import load_discriminator

    src = losses.NLayerDiscriminator(3, 8, 2)
    sd = src.state_dict()
    torch.save(
        {"state_dict": {f"loss.discriminator.{k}": v for k, v in sd.items()}}, tmp_path / "a.pt"
    )
    save_file(sd, str(tmp_path / "b.safetensors"))
    for name in ("a.pt", "b.safetensors"):
        dst = losses.NLayerDiscriminator(3, 8, 2)
        load_discriminator(dst, str(tmp_path / name))
        assert all(torch.equal(dst.state_dict()[k], v) for k, v in sd.items())
    model = tiny(disc_weight=0.5, disc_channels=8, disc_layers=2)
    model.cfg.disc_weights = str(tmp_path / "b.safetensors")
    assert torch.equal(model.make_discriminator().main[0].weight, sd["main.0.weight"])


def test_vfm_perceptual_distance_and_config():
    """perceptual=vfm: the embedded shapes ViT's features, four layers; zero for identical
    images, gradients to the reconstruction only; not in the tokenizer's state_dict."""
    model = build_vavae(
        VAVAEConfig(config="tiny", vfm="local:shapes-vit", vf_weight=0.0, perceptual="vfm"), 32
    )
    p = model.perceptual
    assert isinstance(p, losses.VFMFeatureDistance) and p.vfm.layers == [0, 1, 2, 3]
    assert model.vfm is None  # vf_weight 0: no alignment VFM, the perceptual one stays
    assert set(model.state_dict()) == set(tiny().state_dict())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert p(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    x_hat = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    dist = p(x, x_hat)
    dist.backward()
    assert dist.item() > 0 and x_hat.grad.abs().sum() > 0
    assert all(q.grad is None for q in p.parameters())
    out = model.train().loss(x, 0)
    assert out["perceptual_vfm"].item() > 0
    p.train()
    assert not p.training and not p.vfm.training  # frozen loss networks stay in eval mode
    with pytest.raises(ValueError, match="perceptual_vfm"):
        build_vavae(VAVAEConfig(config="tiny", vfm=None, perceptual="vfm"), 32)


def test_lpips_perceptual_with_a_random_backbone():
    pytest.importorskip("lpips")
    p = losses.LPIPSLoss("alex", pretrained_backbone=False)
    model = tiny(perceptual="lpips")
    model._frozen["perceptual"] = p
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert p(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    out = model.train().loss(x, 0)
    assert out["perceptual_lpips"].item() > 0 and out["loss"].requires_grad
    assert not any(k.startswith(("_frozen", "perceptual")) for k in model.state_dict())


def test_lpips_without_backbone_weights_names_the_file(monkeypatch, tmp_path):
    pytest.importorskip("lpips")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"vgg16-397923af\.pth.*TORCH_HOME"):
        build_vavae(VAVAEConfig(config="tiny", vfm=None, perceptual="lpips"), 32)
