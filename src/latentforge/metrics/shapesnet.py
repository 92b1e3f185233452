"""The embedded classifier of ``shapes`` images, for honest metrics of the embedded default.

Its penultimate features give ``fd_shapesnet`` (a Fréchet distance, not FID) and its
predictions the class accuracy of class-conditional samples. Trained by the recipe
``experiments/assets/shapesnet.yaml`` (``latentforge train-asset``); weights ship in
``src/latentforge/assets/shapesnet.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

ASSETS = Path(__file__).resolve().parent.parent / "assets"
INPUT_SIZE = 64


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ShapesNet(nn.Module):
    """Small VGG-style CNN: 64x64 input, four conv stages, global pooling, 2 linear layers."""

    def __init__(self, num_classes: int = 10, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.config = {"num_classes": num_classes, "width": width, "feature_dim": feature_dim}
        w = width
        self.stages = nn.ModuleList(
            [_block(3, w), _block(w, 2 * w), _block(2 * w, 4 * w), _block(4 * w, 4 * w)]
        )
        self.fc = nn.Linear(4 * w, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Args: images float [-1, 1], (B, 3, H, W), any size. Returns (B, feature_dim)."""
        x = images
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(
                x,
                size=(INPUT_SIZE, INPUT_SIZE),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.stages) - 1:
                x = F.max_pool2d(x, 2)
        x = x.mean(dim=(2, 3))  # (B, 4w)
        return F.relu(self.fc(x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of float [-1, 1] images (B, 3, H, W)."""
        return self.head(self.features(images))


def save_shapesnet(model: ShapesNet, path: str | Path, extra: dict | None = None) -> None:
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    meta = {"config": json.dumps(model.config), "dtype": "float16", **(extra or {})}
    save_file(sd, str(path), metadata=meta)


def load_shapesnet(device: str | torch.device = "cpu", path: str | Path | None = None) -> ShapesNet:
    """The embedded classifier, frozen in eval mode."""
    path = Path(path) if path is not None else ASSETS / "shapesnet.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"embedded classifier weights not found: {path}; "
            "make them with `latentforge train-asset experiments/assets/shapesnet.yaml`"
        )
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    model = ShapesNet(**config)
    sd = load_file(str(path))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return model.to(device).eval().requires_grad_(False)
