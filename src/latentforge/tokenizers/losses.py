"""Tokenizer losses: reconstruction, perceptual, KL, VF alignment, PatchGAN, adaptive weights.

VF loss (Yao et al. 2025, "Reconstruction vs. Generation", Sec. 3): the latent z is
projected to the VFM width by a 1x1 convolution and compared with the VFM patch features f
on the same grid through

- the marginal cosine similarity loss  mean_ij relu(1 - m1 - cos(z'_ij, f_ij)), and
- the marginal distance-matrix loss    mean_(i,j),(k,l) relu(|cos(z'_ij, z'_kl) - cos(f_ij, f_kl)| - m2),

with margins m1 (``margin_cos``) and m2 (``margin_dist``). The VF term is weighted
adaptively by ||grad_last L_rec|| / ||grad_last L_vf|| at the encoder's last layer.

GAN (Esser et al. 2021, "Taming Transformers", Sec. 3.1, as used by LDM and VA-VAE): a
PatchGAN discriminator (Isola et al. 2017, "Image-to-Image Translation with Conditional
Adversarial Networks", Sec. 3.2.2) trained with the hinge loss, its generator term weighted
adaptively by ||grad_last L_rec|| / ||grad_last L_G|| at the decoder's last layer (Eq. 7).

Perceptual terms: LPIPS (Zhang et al. 2018) through the ``lpips`` package, or, offline, a
feature-matching distance on a frozen VFM's patch features (:class:`VFMFeatureDistance`,
logged as ``perceptual_vfm``; it is not LPIPS).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Mean absolute (``l1``) or squared (``l2``) error per pixel."""
    diff = x_hat.float() - x.float()
    return diff.abs().mean() if kind == "l1" else diff.pow(2).mean()


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor, pixels: int) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over latent elements per image, divided by the number
    of image values ``pixels`` (3*H*W), so that with a per-pixel mean reconstruction loss a
    weight keeps the meaning it has in LDM/VA-VAE's sum-reduced losses (1e-6)."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean() / pixels


def marginal_cos_loss(z: torch.Tensor, f: torch.Tensor, margin: float) -> torch.Tensor:
    """z, f: (B, C, h, w) on the same grid. Mean over positions of relu(1 - m - cos)."""
    cos = F.cosine_similarity(z, f, dim=1)  # (B, h, w)
    return F.relu(1.0 - margin - cos).mean()


def marginal_distmat_loss(z: torch.Tensor, f: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean over position pairs of relu(|cos_z(i, j) - cos_f(i, j)| - m), per image."""
    zn = F.normalize(z.flatten(2), dim=1)  # (B, C, N)
    fn = F.normalize(f.flatten(2), dim=1)
    gz = zn.transpose(1, 2) @ zn  # (B, N, N)
    gf = fn.transpose(1, 2) @ fn
    return F.relu((gz - gf).abs() - margin).mean()


def vf_loss(
    z_proj: torch.Tensor, feats: torch.Tensor, margin_cos: float, margin_dist: float
) -> torch.Tensor:
    """VF loss between projected latents and VFM features; the latent grid is resized to the
    VFM's patch grid for the image size at hand."""
    if z_proj.shape[-2:] != feats.shape[-2:]:
        z_proj = F.interpolate(z_proj, size=feats.shape[-2:], mode="bilinear", align_corners=False)
    feats = feats.to(z_proj.dtype)
    return marginal_distmat_loss(z_proj, feats, margin_dist) + marginal_cos_loss(
        z_proj, feats, margin_cos
    )


def adaptive_weight(
    main: torch.Tensor, other: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e8
) -> torch.Tensor:
    """||d main / d last|| / (||d other / d last|| + 1e-4), detached and clamped to
    [0, max_weight] (Esser et al. 2021's adaptive GAN weight, reused by VA-VAE for VF)."""
    g_main = torch.autograd.grad(main, last_layer, retain_graph=True)[0]
    g_other = torch.autograd.grad(other, last_layer, retain_graph=True)[0]
    w = g_main.norm() / (g_other.norm() + 1e-4)
    return w.clamp(0.0, max_weight).detach()


# --------------------------------------------------------------------------- GAN


class NLayerDiscriminator(nn.Module):
    """PatchGAN: one real/fake logit per overlapping image patch (Isola et al. 2017).

    ``layers`` stride-2 4x4 convolutions (widths ``channels * min(2**i, 8)``), one stride-1
    4x4 convolution, then a 4x4 convolution to one channel; BatchNorm and LeakyReLU(0.2)
    between them, none after the first. With ``layers=3`` each logit sees a 70x70 patch.
    Parameter names (``main.{i}.*``) match the discriminator entries of LDM / VA-VAE
    training checkpoints (``loss.discriminator.main.{i}.*``).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            mods += [
                nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            width = out
        mods.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*mods)
        self.init_weights()

    def init_weights(self) -> None:
        """DCGAN initialisation (Radford et al. 2016): conv N(0, 0.02), norm scale N(1, 0.02)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Args: images (B, 3, H, W) in [-1, 1]. Returns logits (B, 1, h, w)."""
        return self.main(images)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))) / 2."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: -mean D(x_hat)."""
    return -logits_fake.mean()


# --------------------------------------------------------------------------- perceptual


class Frozen(nn.Module):
    """A loss network that stays frozen in eval mode whatever ``train()`` is asked."""

    def __init__(self):
        super().__init__()
        self.training = False

    def train(self, mode: bool = True) -> Frozen:
        return super().train(False)


class VFMFeatureDistance(Frozen):
    """Feature-matching distance on a frozen VFM (labelled ``perceptual_vfm``; not LPIPS).

    Mean over the VFM's layers of the spatial mean of the squared distance between
    channel-wise unit-normalised patch features of x and x_hat (so in [0, 4]): LPIPS's
    distance (Zhang et al. 2018, Eq. 1) with unit weights in place of its learned
    per-channel ones. The VFM resizes and normalises its input itself; gradients flow to
    x_hat, never to the VFM.
    """

    def __init__(self, vfm: nn.Module):
        super().__init__()
        self.vfm = vfm.eval().requires_grad_(False)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.vfm.encode(self.vfm.prepare(images)).patch  # (B, C, h, w) per layer

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ref = self.features(x)
        total = x_hat.new_zeros((), dtype=torch.float32)
        for a, b in zip(self.features(x_hat), ref, strict=True):
            d = F.normalize(a.float(), dim=1) - F.normalize(b.float(), dim=1)  # (B, C, h, w)
            total = total + d.pow(2).sum(1).mean()
        return total / len(ref)


class LPIPSLoss(Frozen):
    """LPIPS (Zhang et al. 2018) from the ``lpips`` package: v0.1 linear layers (shipped in the
    package) on torchvision's ImageNet ``vgg`` or ``alex`` backbone from torch's hub cache,
    never downloaded; ``pretrained_backbone=False`` uses a random backbone (tests)."""

    def __init__(self, net: str = "vgg", pretrained_backbone: bool = True):
        super().__init__()
        try:
            import lpips
        except ImportError as e:
            raise ImportError(
                "tokenizer.perceptual=lpips needs the lpips package (pip install lpips)"
            ) from e
        if pretrained_backbone:
            from latentforge.metrics.reconstruction import require_lpips_backbone

            require_lpips_backbone(net, otherwise="set tokenizer.perceptual=vfm")
        with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=`
            warnings.simplefilter("ignore")
            model = lpips.LPIPS(net=net, pnet_rand=not pretrained_backbone, verbose=False)
        self.model = model.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS of images in [-1, 1] (B, 3, H, W); gradients flow to x_hat."""
        return self.model(x_hat, x).mean()


# --------------------------------------------------------------------------- SSIM, multi-scale


def ssim_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """1 - SSIM (Wang et al. 2004; 11x11 Gaussian window, sigma 1.5) of images in [-1, 1],
    both clamped to [-1, 1] (data range 2), through ``pytorch_msssim``. The window is
    applied without padding, so images need at least 11 pixels a side."""
    from pytorch_msssim import ssim

    a = (x_hat.float().clamp(-1, 1) + 1) / 2
    b = (x.float().clamp(-1, 1) + 1) / 2
    return 1.0 - ssim(a, b, data_range=1.0, size_average=True)


def multiscale_l1(
    x: torch.Tensor, outputs: list[torch.Tensor], weights: list[float]
) -> torch.Tensor:
    """Sum over ``outputs`` (smaller images, any order) of weight x the mean absolute error
    against ``x`` resized to their size (bilinear, antialiased when shrinking)."""
    total = x.new_zeros((), dtype=torch.float32)
    for out, w in zip(outputs, weights, strict=False):
        if w == 0:
            continue
        size = out.shape[-2:]
        ref = x
        if ref.shape[-2:] != size:
            shrink = size[-1] < ref.shape[-1]
            ref = F.interpolate(
                ref, size=size, mode="bilinear", align_corners=False, antialias=shrink
            )
        total = total + w * (out.float() - ref.float()).abs().mean()
    return total


# --------------------------------------------------------------------------- ViT-feature GAN
# A discriminator on a frozen ViT's features (StyleGAN-T, Sauer et al. 2023; RAE,
# Zheng et al. 2025, uses DINO ViT-S/8), DiffAugment (Zhao et al. 2020, "Differentiable
# Augmentation for Data-Efficient GAN Training") and LeCAM (Tseng et al. 2021, "Regularizing
# Generative Adversarial Networks under Limited Data").


class DiffAugment(nn.Module):
    """Differentiable translation, colour and cutout, each applied to the whole batch with
    probability ``prob`` (drawn per call), with per-image random amounts."""

    def __init__(self, prob: float = 1.0, translation: float = 0.125, cutout: float = 0.0):
        super().__init__()
        self.prob, self.translation, self.cutout = prob, translation, cutout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B, C, H, W). Returns the augmented batch, same shape."""
        if self.prob <= 0:
            return x
        trans, color, cut = (torch.rand(3) < self.prob).tolist()
        if trans and self.translation > 0:
            x = self.translate(x)
        if color:
            x = self.color(x)
        if cut and self.cutout > 0:
            x = self.cut(x)
        return x

    def translate(self, x: torch.Tensor) -> torch.Tensor:
        """Shift each image by up to ``translation`` of its size, filling with zeros."""
        b, _, h, w = x.shape
        dh, dw = round(h * self.translation), round(w * self.translation)
        ty = torch.randint(-dh, dh + 1, (b, 1, 1), device=x.device)
        tx = torch.randint(-dw, dw + 1, (b, 1, 1), device=x.device)
        iy = (torch.arange(h, device=x.device).view(1, h, 1) + ty + 1).clamp(0, h + 1)  # (B, H, 1)
        ix = (torch.arange(w, device=x.device).view(1, 1, w) + tx + 1).clamp(0, w + 1)  # (B, 1, W)
        bi = torch.arange(b, device=x.device).view(b, 1, 1)
        padded = F.pad(x, [1, 1, 1, 1])  # zero border: indices 0 and H+1 read zeros
        return padded.permute(0, 2, 3, 1)[bi, iy, ix].permute(0, 3, 1, 2)  # (B, C, H, W)

    @staticmethod
    def color(x: torch.Tensor) -> torch.Tensor:
        """Random brightness (+U(-0.5, 0.5)), saturation (x U(0, 2)), contrast (x U(0.5, 1.5))."""
        r = torch.rand(3, x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype)
        x = x + (r[0] - 0.5)
        m = x.mean(dim=1, keepdim=True)
        x = (x - m) * (2 * r[1]) + m
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - m) * (r[2] + 0.5) + m

    def cut(self, x: torch.Tensor) -> torch.Tensor:
        """Zero a square of side ``cutout`` x the image size at a random centre per image."""
        b, _, h, w = x.shape
        ch, cw = round(h * self.cutout), round(w * self.cutout)
        cy = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), device=x.device) - ch // 2
        cx = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), device=x.device) - cw // 2
        ys = torch.arange(h, device=x.device).view(1, h, 1)
        xs = torch.arange(w, device=x.device).view(1, 1, w)
        inside = (ys >= cy) & (ys < cy + ch) & (xs >= cx) & (xs < cx + cw)  # (B, H, W)
        return x * (~inside).unsqueeze(1).to(x.dtype)


class LeCAM(nn.Module):
    """LeCAM regulariser: the discriminator's logits are pulled towards the exponential moving
    averages of its logits on the other side, mean relu(D(x) - a_F)^2 + mean relu(a_R - D(G(z)))^2
    (Tseng et al. 2021, in the one-sided form of their code)."""

    def __init__(self, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        self.ema_real.lerp_(logits_real.float().mean(), 1.0 - self.decay)
        self.ema_fake.lerp_(logits_fake.float().mean(), 1.0 - self.decay)

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        """Updates the averages with this batch, then returns the penalty."""
        self.update(logits_real, logits_fake)
        real = F.relu(logits_real.float() - self.ema_fake).pow(2).mean()
        return real + F.relu(self.ema_real - logits_fake.float()).pow(2).mean()


class _HeadBlock(nn.Sequential):
    """Spectral-norm token convolution, batch-statistics norm, LeakyReLU(0.2)."""

    def __init__(self, channels: int, kernel_size: int, eps: float):
        conv = nn.Conv1d(
            channels, channels, kernel_size, padding=kernel_size // 2, padding_mode="circular"
        )
        super().__init__(
            nn.utils.parametrizations.spectral_norm(conv),
            nn.BatchNorm1d(channels, eps=eps, track_running_stats=False),  # batch stats always
            nn.LeakyReLU(0.2),
        )


class _Residual(nn.Module):
    """(f(x) + x) / sqrt(2)."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fn(x) + x) * 2**-0.5


class VFMDiscriminator(nn.Module):
    """Discriminator on a frozen ViT (any :mod:`~latentforge.tokenizers.vfm` VFM): one
    trainable head per feature level (``layers`` spread over the depth, then the output),
    each a 1x1 and a residual ``kernel_size`` spectral-norm convolution over the token
    sequence and a 1x1 projection to one logit per token. The ViT stays outside the module
    tree: frozen, not in ``state_dict``, no gradients of its own (they flow through it to
    the images)."""

    def __init__(self, vfm: nn.Module, layers: list[int] | None = None, kernel_size: int = 9):
        super().__init__()
        depth = vfm.depth
        layers = list(layers or sorted({round(depth * (k + 1) / 4) - 1 for k in range(4)}))
        self.levels = layers + [depth - 1]  # the key depths, then the output
        vfm.layers = sorted(set(self.levels))
        self._backbone = {"vfm": vfm.eval().requires_grad_(False)}
        c = vfm.embed_dim
        self.heads = nn.ModuleList(
            nn.Sequential(
                _HeadBlock(c, 1, 1e-6),
                _Residual(_HeadBlock(c, kernel_size, 1e-6)),
                nn.utils.parametrizations.spectral_norm(nn.Conv1d(c, 1, 1)),
            )
            for _ in self.levels
        )

    @property
    def vfm(self) -> nn.Module:
        return self._backbone["vfm"]

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.vfm._apply(fn, recurse)  # .to(device) moves the frozen ViT along
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Args: images (B, 3, H, W) in [-1, 1]. Returns logits (B, levels * tokens)."""
        grids = self.vfm.encode(self.vfm.prepare(images)).patch  # (B, C, h, w) per layer
        by_layer = dict(zip(self.vfm.layers, grids, strict=True))
        logits = [
            head(by_layer[layer].flatten(2).float()).flatten(1)  # (B, C, N) -> (B, N)
            for head, layer in zip(self.heads, self.levels, strict=True)
        ]
        return torch.cat(logits, dim=1)


class GANCritic(nn.Module):
    """A discriminator behind DiffAugment, with the LeCAM averages it is trained with."""

    def __init__(self, discriminator: nn.Module, augment: nn.Module, lecam: LeCAM | None = None):
        super().__init__()
        self.discriminator = discriminator
        self.augment = augment
        self.lecam = lecam

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Args: images (B, 3, H, W) in [-1, 1]. Returns the logits of the augmented images."""
        return self.discriminator(self.augment(images))


# --------------------------------------------------------------------------- image-text contrastive


def contrastive_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    scale: torch.Tensor | float,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE (Radford et al. 2021, Fig. 3) between image and text
    embeddings (B, D), unit-normalised: the mean of the cross-entropies of the text-to-image
    logits ``scale * t_i . v_j`` over rows and over columns. The target of row i is image i;
    with ``groups`` (B,) (ids of equal captions) it is uniform over the images whose caption
    equals caption i, so that images sharing a caption (class names) are not pushed apart;
    with distinct captions both are the same."""
    v = F.normalize(image.float(), dim=-1)
    t = F.normalize(text.float(), dim=-1)
    logits = scale * (t @ v.T)  # (B text, B image)
    if groups is None:
        target = torch.arange(len(logits), device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    same = (groups.view(-1, 1) == groups.view(1, -1)).float()  # (B, B), symmetric
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


# --------------------------------------------------------------------------- 1-D token tokenizers
# SoftVQ-VAE (Chen et al. 2024, arXiv 2412.10958) and MAETok (Chen et al. 2025, arXiv
# 2502.03444), as Hhhhhhao/continuous_tokenizer computes them.


def codebook_entropy_loss(logits: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Mean per-row entropy of softmax(logits / T) minus the entropy of the mean
    distribution: every row of every codebook together (logits (..., K)), pushing each token
    to a confident code while the batch uses many (SoftVQ's entropy loss, T = 0.01)."""
    flat = logits.reshape(-1, logits.shape[-1]).float() / temperature
    probs = F.softmax(flat, dim=-1)
    sample = -(probs * F.log_softmax(flat, dim=-1)).sum(-1).mean()
    avg = probs.mean(0)
    return sample + (avg * torch.log(avg + 1e-6)).sum()


def neg_cos(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None):
    """Mean of -cos(pred, target) over tokens (B, N, C) — over the masked tokens only
    when ``mask`` (B, N) is given (MAETok's auxiliary feature targets, REPA-style alignment)."""
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1)  # (B, N)
    if mask is None:
        return -cos.mean()
    m = mask.float()
    return -(cos * m).sum() / m.sum().clamp(min=1)


def _gaussian_window(size: int, device) -> torch.Tensor:
    n = torch.arange(size, dtype=torch.float32, device=device)
    w = torch.exp(-0.5 * ((n - n.mean()) / (size // 2)) ** 2)
    k = w[:, None] * w[None, :]
    return k / k.sum()


@torch.no_grad()
def hog_target(images: torch.Tensor, patch: int, cell: int = 8, bins: int = 9) -> torch.Tensor:
    """HOG features per ``patch`` x ``patch`` token (MaskFeat, Wei et al. 2022, as MAETok's
    ``utils/hog.py``): per RGB channel, Sobel gradients (reflect padding), magnitudes
    weighted by a Gaussian window tiled once per patch (std patch / 2), binned by the
    orientation atan2(g_x, g_y) into ``bins`` signed bins, summed over ``cell`` x ``cell``
    cells and l2-normalised over the bins. Returns (B, N, 3 * bins * (patch / cell)^2) in
    the official order (channel, bin, cell row, cell column): 108 values per 16 px patch."""
    x = F.pad(images.float(), (1, 1, 1, 1), mode="reflect")
    kx = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]], device=x.device)
    gx = F.conv2d(x, kx.expand(3, 1, 3, 3).contiguous(), groups=3)
    gy = F.conv2d(x, kx.t().expand(3, 1, 3, 3).contiguous(), groups=3)
    mag = torch.sqrt(gx**2 + gy**2)  # (B, 3, H, W)
    phase = torch.atan2(gx, gy) / torch.pi * bins  # [-bins, bins]
    b, c, h, w = mag.shape
    mag = mag * _gaussian_window(patch, x.device).repeat(h // patch, w // patch)
    out = torch.zeros(b, c, bins, h, w, device=x.device)
    out.scatter_add_(2, (phase.floor().long() % bins)[:, :, None], mag[:, :, None])
    out = out.unfold(3, cell, cell).unfold(4, cell, cell).sum(dim=(-1, -2))  # (B, 3, bins, h, w)
    out = F.normalize(out, dim=2).flatten(1, 2)  # (B, 3 * bins, H / cell, W / cell)
    u = patch // cell
    out = out.permute(0, 2, 3, 1).unfold(1, u, u).unfold(2, u, u)  # (B, gh, gw, 27, u, u)
    return out.flatten(1, 2).flatten(2)
