"""VFM adapters: every family from a tiny random config, no downloads."""

import json

import pytest
import torch

from latentforge.tokenizers.vfm import load_vfm


def check(vfm, dim, grid, has_cls=True):
    assert not any(p.requires_grad for p in vfm.parameters())
    vfm.train()
    assert not vfm.training
    for size in (32, 48):
        out = vfm(torch.rand(2, 3, size, size) * 2 - 1)
        assert vfm.grid(size) == grid
        assert out.patch[-1].shape == (2, dim, *grid)
        assert (out.cls is not None) == has_cls
        if has_cls:
            assert out.cls.shape == (2, dim)


def test_embedded_shapes_vit_asset():
    vfm = load_vfm("local:shapes-vit")
    check(vfm, vfm.embed_dim, (8, 8))


def test_local_asset_format(tmp_path):
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer

    kwargs = {
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 24,
        "depth": 2,
        "num_heads": 2,
        "num_classes": 0,
    }
    sd = {k: v.half().contiguous() for k, v in VisionTransformer(**kwargs).state_dict().items()}
    meta = {
        "family": "timm",
        "model_kwargs": json.dumps(kwargs),
        "mean": "[0.5,0.5,0.5]",
        "std": "[0.5,0.5,0.5]",
        "dtype": "float16",
    }
    save_file(sd, str(tmp_path / "mini.safetensors"), metadata=meta)
    vfm = load_vfm(f"local:{tmp_path / 'mini.safetensors'}", layers=[0, 1])
    check(vfm, 24, (4, 4))
    assert len(vfm(torch.zeros(1, 3, 32, 32)).patch) == 2


def test_missing_local_asset_names_file_and_recipe():
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors.*train-asset"):
        load_vfm("local:nope")


def test_timm_from_explicit_weights_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    name = "vit_small_patch16_224"
    kw = {"embed_dim": 24, "depth": 2, "num_heads": 2, "img_size": 32, "patch_size": 8}
    model = timm.create_model(name, pretrained=False, num_classes=0, **kw)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors")
    )
    from latentforge.tokenizers import vfm as vfm_mod

    vfm = vfm_mod.TimmVFM(
        timm.create_model(
            name,
            pretrained=True,
            pretrained_cfg_overlay={"file": str(tmp_path / "w.safetensors")},
            num_classes=0,
            **kw,
        ),
        "timm:" + name,
        None,
        True,
        None,
    )
    check(vfm, 24, (4, 4))


def test_timm_missing_weights_error_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(
        FileNotFoundError,
        match=r"vit_small_patch14_dinov2.*huggingface-cli download timm/vit_small_patch14_dinov2",
    ):
        load_vfm("timm:vit_small_patch14_dinov2.lvd142m", weights=None)


def hf_dir(tmp_path, config, model_cls, name):
    torch.manual_seed(0)
    model = model_cls(config)
    path = tmp_path / name
    model.save_pretrained(path)
    return path


def tiny_dinov2_config():
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )


def test_hf_dinov2(tmp_path):
    from transformers import Dinov2Model

    cfg = tiny_dinov2_config()
    check(load_vfm(f"hf:{hf_dir(tmp_path, cfg, Dinov2Model, 'dinov2')}"), 32, (4, 4))


def test_hf_patch_features_are_normalised_like_timms(tmp_path):
    # transformers' hidden_states come before the final LayerNorm; the alignment targets
    # (VA-VAE, REPA; timm's forward_intermediates(norm=True)) are the normalised tokens
    from transformers import Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(tiny_dinov2_config())
    with torch.no_grad():
        model.layernorm.weight.uniform_(0.5, 2.0)
        model.layernorm.bias.normal_()
    model.save_pretrained(tmp_path / "dinov2")
    vfm = load_vfm(f"hf:{tmp_path / 'dinov2'}")
    x = torch.rand(2, 3, 32, 32)  # model input, after the adapter's own preprocessing
    with torch.no_grad():
        grid = vfm.encode(x).patch[-1]
        ref = model.eval()(pixel_values=x).last_hidden_state[:, 1:]
    assert torch.allclose(grid.flatten(2).transpose(1, 2), ref, atol=1e-5)


def test_hf_dinov2_with_registers(tmp_path):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    cfg = Dinov2WithRegistersConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_register_tokens=4,
    )
    check(
        load_vfm(f"hf:{hf_dir(tmp_path, cfg, Dinov2WithRegistersModel, 'dinov2reg')}"), 32, (4, 4)
    )


def test_hf_siglip_vision(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    check(
        load_vfm(f"hf:{hf_dir(tmp_path, cfg, SiglipVisionModel, 'siglip')}"),
        32,
        (4, 4),
        has_cls=True,
    )


def test_hf_clip_vision(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    check(load_vfm(f"hf:{hf_dir(tmp_path, cfg, CLIPVisionModel, 'clip')}"), 32, (4, 4))


def test_hf_vit_mae_keeps_patch_order(tmp_path):
    from transformers import ViTMAEConfig, ViTMAEModel

    cfg = ViTMAEConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    vfm = load_vfm(f"hf:{hf_dir(tmp_path, cfg, ViTMAEModel, 'mae')}")
    check(vfm, 32, (4, 4))
    # MAE shuffles its patch tokens by argsort(noise), even at mask ratio 0; transformers
    # returns ids_restore to put them back. Reference: the model's own tokens, under random
    # noise, unshuffled; the adapter's grid must hold patch (i, j) at row i, column j
    cfg.mask_ratio = 0.0
    torch.manual_seed(0)
    mae = ViTMAEModel(cfg).eval()
    mae.load_state_dict(vfm.model.state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g)  # model input (after preprocessing)
    noise = torch.rand(2, 16, generator=g)
    with torch.no_grad():
        out = mae(pixel_values=x, noise=noise)
        tokens = out.last_hidden_state[:, 1:]  # (B, 16, C) in shuffled order
        index = out.ids_restore.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        ref = torch.gather(tokens, 1, index)
        grid = vfm.encode(x).patch[-1]  # (B, C, 4, 4)
    assert not torch.equal(out.ids_restore[0], torch.arange(16))  # the noise did shuffle
    assert torch.allclose(grid.flatten(2).transpose(1, 2), ref, atol=1e-5)


def test_hf_missing_dir_error():
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        load_vfm("hf:/nonexistent/dinov2-base")


def test_unknown_scheme():
    with pytest.raises(ValueError, match="local:<asset>"):
        load_vfm("dinov2")
