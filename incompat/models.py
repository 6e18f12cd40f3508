"""Models, looked up by name: a small CNN for CPU work, CIFAR ResNet-32 and PreActResNet-18.

Every model has the same two-part shape:
    model.features(x) -> (N, D)   penultimate-layer activations, flattened (spectral signatures and activation
                                  clustering read these)
    model.forward(x)  = model.classifier(model.features(x))
and ends in adaptive average pooling, so any input of at least 8x8 pixels works.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MODEL_NAMES", "build_model", "SmallCNN", "ResNet32", "PreActResNet18", "RawImageClassifier",
           "count_parameters"]


class SmallCNN(nn.Module):
    """The CPU workhorse: `depth` blocks of conv3x3 -> maxpool2 -> BN -> ReLU with widths w, 2w, 4w, ...,
    then global average pooling and one linear layer.

    Pooling right after the convolution (as airbench does) gives BN and ReLU a quarter of the pixels, so it
    trains faster than conv-BN-ReLU-pool at the same accuracy. Width 32 with 3 blocks is about 95k parameters;
    wider nets cost more than their FLOPs suggest (figures: docs/results.md, "Design choices").
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32, depth: int = 3):
        super().__init__()
        blocks: list[nn.Module] = []
        c_in = in_channels
        for i in range(depth):
            c_out = width * 2**i
            blocks += [
                nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
                # ceil_mode keeps odd sizes (e.g. 9x9 -> 5x5) from losing their last row/column.
                nn.MaxPool2d(2, ceil_mode=True),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            c_in = c_out
        self.body = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = c_in
        self.classifier = nn.Linear(c_in, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.body(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# --- ResNet-32 (He et al. 2016, section 4.2: 3 stages of n=5 basic blocks, 16/32/64 channels, option A) -------

class _ShortcutA(nn.Module):
    """Option-A shortcut: subsample by stride 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = _ShortcutA(c_out - c_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet32(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16, blocks_per_stage: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers: list[nn.Module] = []
        c_in = width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks_per_stage):
                layers.append(_BasicBlock(c_in, c_out, stride=2 if (stage > 0 and b == 0) else 1))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = c_in
        self.classifier = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return torch.flatten(self.pool(self.layers(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# --- PreActResNet-18 (He et al. 2016, "Identity mappings"; the layout of kuangliu/pytorch-cifar) --------------

class _PreActBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        layers: list[nn.Module] = []
        c_in = width
        for stage, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
            for b in range(2):
                layers.append(_PreActBlock(c_in, c_out, stride=2 if (stage > 0 and b == 0) else 1))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(c_in)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = c_in
        self.classifier = nn.Linear(c_in, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.conv1(x))
        return torch.flatten(self.pool(F.relu(self.bn(x))), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": lambda nc, ci, w: SmallCNN(nc, ci, width=w or 32),
    "resnet32": lambda nc, ci, w: ResNet32(nc, ci, width=w or 16),
    "preact_resnet18": lambda nc, ci, w: PreActResNet18(nc, ci, width=w or 64),
}
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str, num_classes: int, in_channels: int = 3, width: int | None = None) -> nn.Module:
    """A fresh model by name. `width` is the first stage's channel count (None: the model's standard width:
    small_cnn 32, resnet32 16, preact_resnet18 64). Initialisation uses torch's global RNG: seed it first."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if width is not None and width < 1:
        raise ValueError(f"width must be >= 1 (or None for the default), got {width}")
    return _BUILDERS[name](num_classes, in_channels, width)


class RawImageClassifier(nn.Module):
    """A trained model with its training set's normalisation inside: uint8 images (N, H, W, C) in, logits
    (N, num_classes) out.

    The trainer normalises outside the model (TensorData holds the mean and std), so the bare network scores
    well only when the caller repeats that arithmetic; a model published on its own carries it as buffers. The
    arithmetic is TensorData's: pixel * 1/(255 std) - mean/std on the NHWC bytes, then a channels_last view.
    """

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float64).flatten()
        std = torch.as_tensor(std, dtype=torch.float64).flatten()
        if mean.shape != std.shape or bool((std <= 0).any()):
            raise ValueError(f"mean and std need one value per channel and std > 0, got {mean.tolist()}, "
                             f"{std.tolist()}")
        self.model = model
        self.register_buffer("scale", (1.0 / (255.0 * std)).to(torch.float32))
        self.register_buffer("shift", (-mean / std).to(torch.float32))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(self.shift, images.to(torch.float32), self.scale)  # (N, H, W, C) normalised
        return self.model(x.permute(0, 3, 1, 2))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
