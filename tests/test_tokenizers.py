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


def test_loss_parts_and_adaptive_weight():
    model = tiny(vfm=FakeVFM(), vf_weight=0.5).train()
    out = model.loss(torch.rand(4, 3, 32, 32) * 2 - 1, nimg=0)
    assert {"loss", "recon", "kl", "vf", "vf_weight_eff"} <= set(out)
    assert out["loss"].requires_grad and not out["vf"].requires_grad
    w = out["vf_weight_eff"].item()
    assert 0 < w < float("inf")


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
