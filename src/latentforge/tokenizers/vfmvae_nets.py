"""The networks of VFM-VAE (tokenizers/vfmvae.py): sizes, the adapter (VFM levels ->
posterior moments -> the decoder's wide latent), the synthesis decoder and the named
configs. Attribute names follow the released ``G_ema`` (tianciB/VFM-VAE)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from latentforge.tokenizers.vfmvae_layers import (
    AttentionBlock,
    AttnProjection,
    BlurUpsample,
    ConvNeXtLayer,
    GroupNormF32,
    ToRGB,
)

# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class VFMVAEArch:
    """Sizes of one VFM-VAE (adapter + decoder); independent of the image resolution."""

    vfm_dim: int  # width of the VFM's tokens (every level)
    vfm_patch: int  # the VFM's patch size
    vfm_scale: float = 2.0  # VFM input size / image size
    levels: tuple[int, ...] = (0, 12, -1)  # VFM depths read (0: patch embedding, -1: output)
    level_dims: tuple[int, ...] = (64, 64, 64)  # width of each level after its projection
    z_channels: int = 32
    downsample: int = 16  # image size / latent size
    decompress: int = 16  # post_quant widens the latent to z_channels * decompress
    w_dim: int = 512  # style width (the mapping MLP's output)
    num_blocks: int = 6  # synthesis blocks, each doubling the resolution
    channel_base: int = 32768
    channel_max: int = 512
    num_res_blocks: int = 2
    concat_blocks: tuple[int, ...] = (0, 1, 2, 3)  # blocks the latent is re-injected into
    concat_dims: tuple[int, ...] = (512, 256, 128, 128)  # its width at each of them
    concat_act: str = "lrelu"  # "lrelu", "silu" or "gelu"
    attn_blocks: tuple[int, ...] = (0, 1, 2)  # blocks with self-attention
    attn_depths: tuple[int, ...] = (2, 2, 2)
    attn_heads: int = 8
    # as released: every ConvNeXt layer also adds a learned-strength constant noise map
    # (kept for the published 256 px weights; the authors advise False for new training)
    legacy: bool = True

    def grid_ratio(self) -> int:
        """VFM patch grid / latent grid (the PixelUnshuffle factor of each level)."""
        ratio = self.vfm_scale * self.downsample / self.vfm_patch
        if ratio != int(ratio) or ratio < 1:
            raise ValueError(
                f"the VFM grid (scale {self.vfm_scale}, patch {self.vfm_patch}) is not a "
                f"whole multiple of the latent grid (factor {self.downsample})"
            )
        return int(ratio)

    def block_channels(self, i: int) -> int:
        """Channels of synthesis block ``i`` (StyleGAN-T's channel_base / resolution rule,
        with resolutions counted as at 256 px output)."""
        res256 = 256 * 2**i // 2 ** (self.num_blocks - 1)
        return min(self.channel_base // max(res256, 1), self.channel_max)


class Adapter(nn.Module):
    """VFM levels -> posterior moments; latent -> the decoder's wide latent."""

    def __init__(self, arch: VFMVAEArch, vf_dim: int | None = None):
        super().__init__()
        self.ratio = arch.grid_ratio()
        self.patch_quants = nn.ModuleList(
            nn.Sequential(AttnProjection(arch.vfm_dim, d)) for d in arch.level_dims
        )
        final_in = sum(d * self.ratio**2 for d in arch.level_dims)
        self.final_quant = AttnProjection(final_in, 2 * arch.z_channels)
        self.post_quant = AttnProjection(arch.z_channels, arch.z_channels * arch.decompress)
        # the VF loss's projection of z to the VFM width (training only)
        self.linear_proj = nn.Conv2d(arch.z_channels, vf_dim, 1, bias=False) if vf_dim else None
        self.init_weights()

    def init_weights(self) -> None:
        """As released: linear layers truncated N(0, 0.02), convolutions Xavier-normal with
        gain 0.5, zero biases, unit norms; attention biases start at zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight, gain=0.5)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def encode(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """Args: levels, one (B, C_vfm, gh, gw) grid per VFM level. Returns the posterior
        moments (B, 2 z, gh / r, gw / r), mean first."""
        parts = []
        gh, gw = levels[0].shape[-2:]
        r = self.ratio
        for grid, quant in zip(levels, self.patch_quants, strict=True):
            t = quant(rearrange(grid, "b c h w -> b (h w) c"))  # (B, gh*gw, d)
            parts.append(  # PixelUnshuffle order: channel, then row/column offset
                rearrange(t, "b (h p w q) d -> b (h w) (d p q)", h=gh // r, p=r, w=gw // r, q=r)
            )
        x = self.final_quant(torch.cat(parts, dim=-1))  # (B, h*w, 2z)
        return rearrange(x, "b (h w) c -> b c h w", h=gh // r)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Args: z (B, z, h, w). Returns (B, z * decompress, h, w)."""
        h = z.shape[-2]
        x = self.post_quant(rearrange(z, "b c h w -> b (h w) c"))  # (B, h*w, C)
        return rearrange(x, "b (h w) c -> b c h w", h=h)


def _zconv(cin: int, cout: int, act: str | None, depthwise: bool) -> nn.Sequential:
    """(depthwise 3x3,) 1x1, GroupNorm (, activation): the latent's path into a block."""
    layers: list[nn.Module] = []
    if depthwise:
        layers.append(nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False))
    layers += [nn.Conv2d(cin, cout, 1, bias=False), GroupNormF32(min(32, cout), cout)]
    if act is not None:
        layers.append({"lrelu": nn.LeakyReLU(0.2), "silu": nn.SiLU(), "gelu": nn.GELU()}[act])
    return nn.Sequential(*layers)


def latent_injection(arch: VFMVAEArch, i: int, z_dim: int, out: int) -> nn.Sequential:
    """The latent resampled to block ``i``'s input grid (half the block's resolution):
    PixelUnshuffle when the latent is finer, PixelShuffle after the conv when coarser."""
    # twice the latent's resolution over the block's (both relative to the output size)
    ratio = 2 * 2 ** (arch.num_blocks - 1 - i) / arch.downsample
    if ratio > 1:
        f = int(ratio)
        return nn.Sequential(
            nn.PixelUnshuffle(f),
            _zconv(z_dim * f * f, out, arch.concat_act, True),
            _zconv(out, out, None, False),
        )
    if ratio == 1:
        return nn.Sequential(
            _zconv(z_dim, out, arch.concat_act, True), _zconv(out, out, None, False)
        )
    f = int(1 / ratio)
    return nn.Sequential(
        _zconv(z_dim, out * f * f, arch.concat_act, True),
        nn.PixelShuffle(f),
        _zconv(out, out, None, False),
    )


class SynthesisBlock(nn.Module):
    """One x2 block: upsample, ConvNeXt layers, self-attention, RGB skip output."""

    def __init__(self, arch: VFMVAEArch, i: int, in_channels: int):
        super().__init__()
        out = arch.block_channels(i)
        kernel, blur = (5 if i <= 1 else 7), ("3x3" if i <= 2 else "5x5")
        noise = 8 * 2**i if arch.legacy else None  # the released 256 px sizes
        self.seperate_upsample_conv = BlurUpsample(in_channels, out, blur, pre_norm=i > 0)
        self.conv0 = ConvNeXtLayer(out, arch.w_dim, kernel, noise)
        n = arch.num_res_blocks * (3 if i <= 3 else 2)
        self.convs1 = nn.ModuleList(ConvNeXtLayer(out, arch.w_dim, kernel, noise) for _ in range(n))
        self.torgb = ToRGB(out, arch.w_dim)
        if i > 0:
            prev = arch.block_channels(i - 1)
            self.last_upsample_conv = BlurUpsample(prev, out, blur)
        depth = arch.attn_depths[arch.attn_blocks.index(i)] if i in arch.attn_blocks else 0
        if depth:
            self.self_attns = nn.ModuleList(
                AttentionBlock(out, arch.attn_heads) for _ in range(depth)
            )

    def forward(self, x: torch.Tensor, x_sum: torch.Tensor | None, w: torch.Tensor):
        """Args: x (B, C_in, H, W), x_sum the running skip features (B, C_prev, H, W) or
        None, w (B, w_dim). Returns x and x_sum (B, C, 2H, 2W) and the RGB (B, 3, 2H, 2W)."""
        x = self.conv0(self.seperate_upsample_conv(x), w)
        for conv in self.convs1:
            x = conv(x, w)
        for attn in getattr(self, "self_attns", ()):
            x = attn(x)
        x_sum = x if x_sum is None else self.last_upsample_conv(x_sum) + x
        return x, x_sum, self.torgb(x_sum, w)


class Synthesis(nn.Module):
    """StyleGAN-T-style decoder: wide latent + style -> image and smaller images."""

    def __init__(self, arch: VFMVAEArch, z_dim: int):
        super().__init__()
        if 0 not in arch.concat_blocks:
            raise ValueError("the first synthesis block must receive the latent (concat_blocks)")
        self.concat_blocks = tuple(arch.concat_blocks)
        self.z_convs = nn.ModuleDict(
            {
                str(i): latent_injection(arch, i, z_dim, d)
                for i, d in zip(arch.concat_blocks, arch.concat_dims, strict=True)
            }
        )
        blocks = {}
        for i in range(arch.num_blocks):
            cin = arch.block_channels(i - 1) if i > 0 else 0
            if i in arch.concat_blocks:
                cin += arch.concat_dims[arch.concat_blocks.index(i)]
            blocks[str(i)] = SynthesisBlock(arch, i, cin)
        self.blocks = nn.ModuleDict(blocks)

    def forward(self, z: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Args: z (B, C_z, h, w) the wide latent, w (B, w_dim). Returns the image
        (B, 3, h f, w f) and the other blocks' RGB outputs, largest first."""
        x = x_sum = None
        images = []
        for i, block in enumerate(self.blocks.values()):
            if i in self.concat_blocks:
                zi = self.z_convs[str(i)](z)
                x = zi if x is None else torch.cat([x, zi], dim=1)
            x, x_sum, img = block(x, x_sum, w)
            images.append(img)
        return images[-1], images[-2::-1]


# ----------------------------------------------------------------------------- configs


_VFM_SIGLIP2_L16 = dict(vfm_dim=1024, vfm_patch=16)
CONFIGS: dict[str, VFMVAEArch] = {
    # the published model: SigLIP2-L/16 at 512 px (2x the 256 px image), 32x16x16 latents
    "f16d32-siglip2": VFMVAEArch(**_VFM_SIGLIP2_L16),
    # the embedded default: 32x32 shapes, the shapes ViT at its own 32 px (8x8 patches of
    # 4 px; the published model reads its VFM at 2x, which here would cost 4x the tokens)
    # read at its embedding, block 2 and output -> 8x8x4 latents (as VA-VAE's shapes-f4d4)
    "shapes": VFMVAEArch(
        vfm_dim=128,
        vfm_patch=4,
        vfm_scale=1.0,
        levels=(0, 2, -1),
        level_dims=(16, 16, 16),
        z_channels=4,
        downsample=4,
        decompress=16,
        w_dim=64,
        num_blocks=3,
        channel_base=4096,
        channel_max=64,
        num_res_blocks=1,
        concat_blocks=(0, 1),
        concat_dims=(64, 32),
        attn_blocks=(0,),
        attn_depths=(1,),
        attn_heads=4,
        legacy=False,
    ),
    # tests (and the parity fixture): a 16-wide, patch-4 VFM at 64 px for 32 px images;
    # the three ways the latent enters a block (PixelUnshuffle, as it is, PixelShuffle)
    "tiny": VFMVAEArch(
        vfm_dim=16,
        vfm_patch=4,
        levels=(0, 1, -1),
        level_dims=(4, 4, 4),
        z_channels=4,
        downsample=4,
        decompress=4,
        w_dim=16,
        num_blocks=3,
        channel_base=4096,
        channel_max=16,
        num_res_blocks=1,
        concat_blocks=(0, 1, 2),
        concat_dims=(8, 8, 4),
        attn_blocks=(0, 1),
        attn_depths=(1, 1),
        attn_heads=8,
        legacy=True,
    ),
}
