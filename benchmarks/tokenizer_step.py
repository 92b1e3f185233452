"""Encode and decode time of the VA-VAE, RAE, SVG, Siglip-VAE, SoftVQ-VAE and MAETok tokenizers.

Default case: VA-VAE f16d32 (the published architecture, 69.8M parameters), batch 4,
256x256 images, fp32, 2 threads, eval mode without gradients; median of 5 timed calls after
one warm-up call. ``encode`` is encoder + quant_conv + a posterior sample (what the official
``VA_VAE.encode_images`` does), ``decode`` is post_quant_conv + decoder. Reports seconds per
call, images/s and achieved FLOP/s (FLOPs counted by ``torch.utils.flop_counter``).

With ``--official PATH`` (a checkout of hustvl/LightningDiT; nothing is downloaded) the same
calls are timed on the official ``tokenizer.autoencoder.AutoencoderKL`` holding the same
weights, and the speed-ups are reported. Implementations are timed in alternation (one call
of each per round), so load from other processes on a shared machine hits both alike.

RAE (``--family rae``, default config ``dinov2-b``: DINOv2-B with registers, random weights
built from its architecture, and the ViT-XL decoder at 256 px): ``encode`` is the frozen
encoder's pass (bicubic resize, normalisation, last layer), ``decode`` the decoder with
unpatchify and un-normalisation. With ``--official PATH`` (a checkout of bytetriper/RAE) the
decode is also timed on the official ``stage1.decoders.GeneralDecoder`` holding the same
weights (the encoder is transformers' model in both, so it is timed once).

    python benchmarks/tokenizer_step.py --out runs/bench/tokenizer_step.json
    python benchmarks/tokenizer_step.py --official ../LightningDiT
    python benchmarks/tokenizer_step.py --family rae --official ../RAE
    python benchmarks/tokenizer_step.py --family svg --official ../SVG
    python benchmarks/tokenizer_step.py --family siglipvae
    python benchmarks/tokenizer_step.py --family softvq --official ../continuous_tokenizer
    python benchmarks/tokenizer_step.py --family maetok --official ../continuous_tokenizer

SVG (``--family svg``, default config ``dinov3-s16p``: timm's DINOv3 ViT-S/16+ architecture
with random weights, the 8-channel residual ViT and the LDM decoder to 392-channel latents,
256 px): ``encode`` is the VFM and the residual ViT (torchvision's ``VisionTransformer`` in
both implementations, so it is timed once), ``decode`` the decoder; with ``--official PATH``
(a checkout of shiml20/SVG, with einops installed) the decode is also timed on the official
``ldm.modules.diffusionmodules.model.Decoder`` holding the same weights.

SoftVQ-VAE and MAETok (``--family softvq`` / ``maetok``, default ``softvq-l-64`` /
``maetok-b-128`` at 256 px, random weights): ``encode`` gives the (B, D, L) token latents,
``decode`` the images; ``--official PATH`` (a checkout of Hhhhhhao/continuous_tokenizer)
times the official models holding the same weights. JSON out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from timing import emit
from torch.utils.flop_counter import FlopCounterMode

from latentforge.tokenizers.token1d_model import TRAINING_ONLY_KEYS
from latentforge.tokenizers.vavae import CONFIGS, VAVAE, AEArch, VAVAEConfig


def official_model(repo: Path, arch: AEArch, resolution: int):
    """The official autoencoder with the same architecture (imported from the user's
    checkout). Its ``AutoencoderKL`` builds the f16 encoder/decoder; other architectures get
    the official ``Encoder``/``Decoder`` built from our config, attention placed by pixel size."""
    if arch.groups != 32 or not arch.mid_attn:
        raise SystemExit("--official: the official code has GroupNorm(32) and mid attention")
    sys.path.insert(0, str(repo))
    from tokenizer.autoencoder import AutoencoderKL, Decoder, Encoder

    model = AutoencoderKL(embed_dim=arch.z_channels, ch_mult=arch.ch_mult)
    kw = dict(
        ch=arch.ch,
        ch_mult=arch.ch_mult,
        num_res_blocks=arch.num_res_blocks,
        attn_resolutions=tuple(resolution // 2**level for level in arch.attn_levels),
        resolution=resolution,
        z_channels=arch.z_channels,
    )
    model.encoder, model.decoder = Encoder(**kw), Decoder(**kw)
    return model


def official_calls(model) -> dict[str, Callable]:
    return {"encode": lambda x: model.encode(x).sample(), "decode": model.decode}


def our_calls(model: VAVAE) -> dict[str, Callable]:
    return {"encode": lambda x: model.encode(x, sample=True), "decode": model.decode}


def time_alternating(
    impls: dict[str, dict[str, Callable]], inputs: dict[str, torch.Tensor], repeats: int
) -> dict[str, dict[str, float]]:
    """Median seconds of every (implementation, call), one call of each per round."""
    times = {name: {call: [] for call in calls} for name, calls in impls.items()}
    for r in range(repeats + 1):  # round 0 is the warm-up
        for name, calls in impls.items():
            for call, fn in calls.items():
                t0 = time.perf_counter()
                fn(inputs[call])
                if r:
                    times[name][call].append(time.perf_counter() - t0)
    return {n: {c: statistics.median(v) for c, v in d.items()} for n, d in times.items()}


def count_flops(fn: Callable, x: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter:
        fn(x)
    return float(counter.get_total_flops())


def vavae_case(args) -> tuple[dict, dict]:
    """Implementations and inputs of the VA-VAE benchmark."""
    arch = CONFIGS[args.config]
    ours = VAVAE(arch, VAVAEConfig(config=args.config, vfm=None)).eval()
    x = torch.rand(args.batch, 3, args.resolution, args.resolution) * 2 - 1
    with torch.no_grad():
        z = ours.encode(x)
    impls = {"latentforge": our_calls(ours)}
    if args.official:
        official = official_model(args.official, arch, args.resolution).eval()
        official.load_state_dict(ours.state_dict(), strict=True)  # same keys, same weights
        impls["official"] = official_calls(official)
    return impls, {"encode": x, "decode": z}


def rae_encoder(arch):
    """The named config's encoder: DINOv2-B with registers built from its architecture
    (random weights: nothing is downloaded, the time is the same), else the VFM spec."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from latentforge.tokenizers.vfm import HFVFM, IMAGENET_MEAN, IMAGENET_STD, load_vfm

    if "dinov2-with-registers-base" not in arch.encoder:
        return load_vfm(arch.encoder)
    cfg = Dinov2WithRegistersConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                    patch_size=14, image_size=518, num_register_tokens=4)  # fmt: skip
    model = Dinov2WithRegistersModel(cfg)
    return HFVFM(model, arch.encoder, None, True, 224, IMAGENET_MEAN, IMAGENET_STD)


def official_rae_decode(repo: Path, ours, arch) -> Callable:
    """The official ``GeneralDecoder`` with our decoder's weights, called as the official
    ``RAE.decode`` calls it (tokens, unpatchify, un-normalise)."""
    sys.path.insert(0, str(repo / "src"))
    from stage1.decoders import GeneralDecoder
    from stage1.decoders.utils import ViTMAEConfig

    cfg = ViTMAEConfig(hidden_size=ours.latent_channels, decoder_hidden_size=arch.hidden,
                       decoder_num_hidden_layers=arch.depth, decoder_num_attention_heads=arch.heads,
                       decoder_intermediate_size=arch.mlp, patch_size=arch.patch,
                       image_size=ours.grid * arch.patch, num_channels=3, hidden_act="gelu",
                       layer_norm_eps=arch.layer_norm_eps, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, qkv_bias=True)  # fmt: skip
    dec = GeneralDecoder(cfg, num_patches=ours.grid**2).eval()
    dec.load_state_dict(ours.decoder.state_dict(), strict=True)
    mean, std = ours.encoder.mean, ours.encoder.std

    def decode(z: torch.Tensor) -> torch.Tensor:
        out = dec(z.flatten(2).transpose(1, 2), drop_cls_token=False).logits
        return dec.unpatchify(out) * std + mean

    return decode


def rae_case(args) -> tuple[dict, dict]:
    """Implementations and inputs of the RAE benchmark."""
    from latentforge.tokenizers.rae import CONFIGS as RAE_CONFIGS
    from latentforge.tokenizers.rae import RAE, RAEConfig

    arch = RAE_CONFIGS[args.config]
    cfg = RAEConfig(config=args.config, perceptual="none", disc_weight=0.0)
    ours = RAE(arch, cfg, args.resolution, rae_encoder(arch)).eval()
    x = torch.rand(args.batch, 3, args.resolution, args.resolution) * 2 - 1
    with torch.no_grad():
        z = ours.encode(x)
    impls = {"latentforge": {"encode": ours.encode, "decode": ours.decode}}
    if args.official:
        impls["official"] = {"decode": official_rae_decode(args.official, ours, arch)}
    return impls, {"encode": x, "decode": z}


def svg_vfm(arch):
    """The named config's frozen VFM with random weights (nothing is downloaded, the time is
    the same): timm's DINOv3 ViT-S/16+ architecture for ``dinov3-s16p``, else the spec."""
    import timm

    from latentforge.tokenizers.vfm import TimmVFM, load_vfm

    if not arch.vfm.startswith("timm:"):
        return load_vfm(arch.vfm)
    model = timm.create_model(arch.vfm.split(":", 1)[1], pretrained=False, img_size=arch.image_size)
    return TimmVFM(model, arch.vfm, None, True, None)


def official_svg_decode(repo: Path, ours, arch, resolution: int) -> Callable:
    """The official LDM ``Decoder`` of shiml20/SVG (``autoencoder/ldm``, which needs einops)
    with our decoder's weights, called as ``DinoDecoder.decode`` calls it."""
    dec_arch = arch.decoder
    if dec_arch.groups != 32 or not dec_arch.mid_attn:
        raise SystemExit("--official: the official decoder has GroupNorm(32) and mid attention")
    sys.path.insert(0, str(repo / "autoencoder"))
    from ldm.modules.diffusionmodules.model import Decoder

    dec = Decoder(ch=dec_arch.ch, out_ch=3, ch_mult=dec_arch.ch_mult,
                  num_res_blocks=dec_arch.num_res_blocks,
                  attn_resolutions=[resolution // 2**lv for lv in dec_arch.attn_levels],
                  dropout=0.0, in_channels=3, resolution=resolution,
                  z_channels=dec_arch.z_channels).eval()  # fmt: skip
    dec.load_state_dict(ours.decoder.state_dict(), strict=True)
    return dec


def svg_case(args) -> tuple[dict, dict]:
    """Implementations and inputs of the SVG benchmark: ``encode`` is the frozen VFM plus
    the residual ViT (torchvision's, as in the official code; timed once), ``decode`` the
    LDM decoder, ours and, with ``--official``, SVG's."""
    from latentforge.tokenizers.svg import CONFIGS as SVG_CONFIGS
    from latentforge.tokenizers.svg import SVG, SVGConfig

    arch = SVG_CONFIGS[args.config]
    cfg = SVGConfig(config=args.config, perceptual="none", disc_weight=0.0, match="batch")
    ours = SVG(arch, cfg, svg_vfm(arch)).eval()  # the published batch-statistics matching
    x = torch.rand(args.batch, 3, args.resolution, args.resolution) * 2 - 1
    with torch.no_grad():
        z = ours.encode(x)
    impls = {"latentforge": {"encode": ours.encode, "decode": ours.decode}}
    if args.official:
        impls["official"] = {
            "decode": official_svg_decode(args.official, ours, arch, args.resolution)
        }
    return impls, {"encode": x, "decode": z}


def siglipvae_case(args) -> tuple[dict, dict]:
    """Implementations and inputs of the Siglip-VAE benchmark: ``encode`` is VA-VAE's encoder
    plus the frozen SigLIP and the fusion projection, ``decode`` VA-VAE's decoder. The SigLIP
    is transformers' ``SiglipVisionModel`` with random weights (nothing is downloaded, the time
    is the same): SigLIP2-so400m/16 for ``f16d32-siglip2``, else a 2-layer, 64-wide one with
    the latent grid. No official comparison: the official extraction is the VA-VAE encoder
    (timed by ``--family vavae``) plus the same transformers SigLIP."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from latentforge.tokenizers.siglipvae import CONFIGS as SV_CONFIGS
    from latentforge.tokenizers.siglipvae import SiglipVAE, SiglipVAEConfig
    from latentforge.tokenizers.vfm import HFVFM

    arch = SV_CONFIGS[args.config]
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    if args.config == "f16d32-siglip2":
        size = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                    num_attention_heads=16)  # fmt: skip
    siglip = SiglipVisionModel(
        SiglipVisionConfig(**size, patch_size=arch.downsample, image_size=args.resolution)
    )
    vfm = HFVFM(siglip, "siglip", None, False, None, (0.5,) * 3, (0.5,) * 3)
    cfg = SiglipVAEConfig(config=args.config, perceptual="none")
    ours = SiglipVAE(arch, cfg, vfm).eval()
    x = torch.rand(args.batch, 3, args.resolution, args.resolution) * 2 - 1
    with torch.no_grad():
        z = ours.encode(x)
    calls = {"encode": lambda im: ours.encode(im, sample=True), "decode": ours.decode}
    return {"latentforge": calls}, {"encode": x, "decode": z}


def official_token1d(repo: Path, ours, arch) -> dict[str, Callable]:
    """The official ``SoftVQModel`` / ``AEModel`` of Hhhhhhao/continuous_tokenizer (needs
    einops and scipy; its LoRA-only ``peft`` import is stood in for when absent) built with
    the same architecture, random init (``enc_pretrained=False``, REPA off: nothing is
    downloaded), holding our weights; its calls take and return our layouts."""
    import types

    for name in ("peft",):
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)
    sys.path.insert(0, str(repo))
    from modelling.tokenizer import AEModel, ModelArgs, SoftVQModel

    size = {768: "base", 1024: "large"}
    enc, dec = (f"vit_{size[w]}_patch14_dinov2.lvd142m" for w in (arch.width, arch.dec_width))
    if arch.movq:
        dec = f"vit_{size[arch.dec_width]}_patch14_dinov2_movqv2"
    args = ModelArgs(
        image_size=ours.resolution, base_image_size=arch.image_size, enc_type="vit",
        dec_type="vit", encoder_model=enc, decoder_model=dec, enc_pretrained=False,
        dec_pretrained=False, num_latent_tokens=arch.tokens, codebook_embed_dim=arch.channels,
        codebook_size=arch.codebook_size or 16384, num_codebooks=arch.codebooks or 1,
        tau=arch.tau, enc_patch_size=arch.patch, dec_patch_size=arch.decoder_patch,
        use_ape=not arch.rope, use_rope=arch.rope, rope_mixed=arch.rope,
        rope_theta=arch.rope_theta, dec_cls_token=arch.dec_cls_token,
        enc_token_drop=0.4 if arch.mask_token else 0.0, repa=False,
    )  # fmt: skip
    official = (SoftVQModel if arch.kind == "softvq" else AEModel)(args).eval()
    missing, unexpected = official.load_state_dict(ours.state_dict(), strict=False)
    if unexpected or [k for k in missing if not TRAINING_ONLY_KEYS.match(k)]:
        raise SystemExit(
            f"--official: keys differ: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return {
        "encode": lambda im: official.encode(im)[0].transpose(1, 2),
        "decode": lambda z: official.decode(z.transpose(1, 2)),
    }


def token1d_case(args) -> tuple[dict, dict]:
    """Implementations and inputs of the MAETok / SoftVQ-VAE benchmark (random weights of the
    named architecture): ``encode`` is the ViT encoder with its latent tokens, the linear
    projection and (SoftVQ) the soft quantiser, ``decode`` the ViT decoder; with
    ``--official`` the same calls on the official model holding the same weights."""
    from latentforge.tokenizers.token1d import MAETokConfig, Token1DConfig, resolve_arch
    from latentforge.tokenizers.token1d_model import Token1D

    schema = MAETokConfig if args.family == "maetok" else Token1DConfig
    off = dict(perceptual="none", disc_weight=0.0, repa_weight=0.0, mask_min=0.0, mask_max=0.0)
    cfg = schema(config=args.config, **off)
    arch = resolve_arch(cfg)
    ours = Token1D(arch, cfg, args.resolution).eval()
    x = torch.rand(args.batch, 3, args.resolution, args.resolution) * 2 - 1
    with torch.no_grad():
        z = ours.encode(x)
    impls = {"latentforge": {"encode": ours.encode, "decode": ours.decode}}
    if args.official:
        impls["official"] = official_token1d(args.official, ours, arch)
        with torch.no_grad():  # the same numbers, checked at the benchmarked size
            args.max_abs_diff = {
                c: (impls["official"][c](v) - impls["latentforge"][c](v)).abs().max().item()
                for c, v in (("encode", x), ("decode", z))
            }
    return impls, {"encode": x, "decode": z}


CASES = {
    "vavae": ("f16d32", vavae_case),
    "rae": ("dinov2-b", rae_case),
    "svg": ("dinov3-s16p", svg_case),
    "siglipvae": ("f16d32-siglip2", siglipvae_case),
    "softvq": ("softvq-l-64", token1d_case),
    "maetok": ("maetok-b-128", token1d_case),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="vavae", choices=list(CASES))
    ap.add_argument("--config", help="named config (default: each family's published one)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--official", type=Path, help="checkout of the official repository to compare")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/tokenizer_step.json"))
    args = ap.parse_args()
    default_config, case = CASES[args.family]
    args.config = args.config or default_config

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    impls, inputs = case(args)
    with torch.no_grad():
        flops = {c: count_flops(impls["latentforge"][c], v) for c, v in inputs.items()}
        medians = time_alternating(impls, inputs, args.repeats)
    rows = []
    for name, per_call in medians.items():
        for call, sec in per_call.items():
            rows.append(
                {
                    "implementation": name,
                    "call": call,
                    "seconds": sec,
                    "images_per_s": args.batch / sec,
                    "flops": flops[call],
                    "achieved_gflops": flops[call] / sec / 1e9,
                }
            )
    results = {
        "family": args.family,
        "config": args.config,
        "batch": args.batch,
        "resolution": args.resolution,
        "threads": args.threads,
        "repeats": args.repeats,
        "dtype": "float32",
        "torch": torch.__version__,
        "loadavg": list(os.getloadavg()),
        "rows": rows,
    }
    if args.official:
        results["speedup_vs_official"] = {
            c: medians["official"][c] / medians["latentforge"][c] for c in medians["official"]
        }
    if getattr(args, "max_abs_diff", None):
        results["max_abs_diff_vs_official"] = args.max_abs_diff
    emit(results, args.out)


if __name__ == "__main__":
    main()
