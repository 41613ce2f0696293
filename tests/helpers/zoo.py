"""A zoo of tiny, fx-traceable models, each with the layer names suited to every edit.

Contract tests parametrize every edit over :func:`list_cases` (timm parametrizes over
``list_models()``); each :class:`ZooCase` says which layers each edit may target.

Example:
    >>> case = get_case("vgg")
    >>> model = case.build().eval()
    >>> model(*case.inputs(4)).shape
    torch.Size([4, 10])

Models are returned in training mode, as a constructor would; call ``.eval()`` before comparing
outputs (Dropout is random and BatchNorm uses batch statistics in training mode).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ZOO",
    "BasicBlock",
    "Bottleneck",
    "InvertedResidual",
    "ZooCase",
    "get_case",
    "list_cases",
]


@dataclass(frozen=True)
class ZooCase:
    """One zoo model with its example data and the layers each edit may target."""

    name: str  # key in ZOO
    build: Callable[[], nn.Module]  # fresh model; deterministic given torch.manual_seed
    inputs: Callable[[int], tuple[torch.Tensor, ...]]  # batch size -> inputs (generator seeded 0)
    target: Callable[[int], torch.Tensor]  # batch size -> class indices for cross-entropy
    widen: tuple[str, ...]  # producers whose output units can be widened (never the output layer)
    narrow: tuple[str, ...]  # producers whose output units can be removed
    deepen: tuple[str, ...]  # Conv/Linear after which an identity layer of the same kind fits
    skips: tuple[tuple[str, str], ...]  # (src, dst): dst's input is downstream of src's output
    blocks: tuple[str, ...]  # residual blocks that can be removed
    no_shortcut_blocks: tuple[str, ...]  # submodules that are not residual (for error tests)
    has_norm: bool = False  # widen/deepen touch normalisation layers (informational)
    widen_uniform_only: tuple[
        str, ...
    ] = ()  # in widen, but a LayerNorm follows: duplicate all units

    def __post_init__(self) -> None:
        """Reject malformed cases early, naming the offending field."""
        if not self.name:
            raise ValueError("ZooCase.name must be a non-empty string")
        for field in ("widen", "narrow", "deepen", "blocks", "no_shortcut_blocks"):
            value = getattr(self, field)
            if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                raise TypeError(
                    f"ZooCase {self.name!r}: {field} must be a tuple of str, got {value!r}"
                )
        for pair in self.skips:
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise TypeError(
                    f"ZooCase {self.name!r}: each skip must be (src, dst), got {pair!r}"
                )
        unknown = set(self.widen_uniform_only) - set(self.widen)
        if unknown:
            raise ValueError(
                f"ZooCase {self.name!r}: widen_uniform_only {sorted(unknown)} not in widen"
            )


# ----------------------------------------------------------------------------- data


def _randn_inputs(*shape: int) -> Callable[[int], tuple[torch.Tensor, ...]]:
    """Return batch -> (standard normal tensor of shape [batch, *shape],), generator seeded 0."""

    def inputs(batch: int) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(0)
        return (torch.randn(batch, *shape, generator=gen),)

    return inputs


def _token_inputs(vocab: int, length: int) -> Callable[[int], tuple[torch.Tensor, ...]]:
    """Return batch -> (int64 tokens [batch, length] in [0, vocab),), generator seeded 0."""

    def inputs(batch: int) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(0)
        return (torch.randint(0, vocab, (batch, length), generator=gen),)

    return inputs


def _class_targets(num_classes: int) -> Callable[[int], torch.Tensor]:
    """Return batch -> int64 class indices in [0, num_classes), generator seeded 0."""

    def target(batch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        return torch.randint(0, num_classes, (batch,), generator=gen)

    return target


# ----------------------------------------------------------------------------- models


def _mlp() -> nn.Module:
    """A plain ``nn.Sequential`` MLP with LayerNorm, GELU and Dropout."""
    return nn.Sequential(
        nn.Linear(16, 32),
        nn.LayerNorm(32),
        nn.GELU(),
        nn.Dropout(0.1),
        nn.Linear(32, 24),
        nn.ReLU(),
        nn.Linear(24, 5),
    )


class VGG(nn.Module):
    """Two Conv-BN-ReLU-MaxPool stages and a two-layer classifier, flattened with ``view``."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify a [B, 3, 16, 16] image batch."""
        x = self.features(x)
        x = x.view(x.size(0), -1)
        return self.classifier(x)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()  # called twice, as in torchvision
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (1x1 reduce, 3x3, 1x1 expand) with an identity shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int) -> None:
        super().__init__()
        width = planes * self.expansion
        if width != inplanes:
            raise ValueError(
                f"identity Bottleneck needs inplanes == 4 * planes, got {inplanes}, {planes}"
            )
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + x)


class ResNet(nn.Module):
    """Stem, BasicBlock(8, 8), BasicBlock(8, 16, stride 2) with downsample, Bottleneck(16, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        downsample = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.layer1 = nn.Sequential(
            BasicBlock(8, 8), BasicBlock(8, 16, stride=2, downsample=downsample)
        )
        self.layer2 = nn.Sequential(Bottleneck(16, 4))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify a [B, 3, 16, 16] image batch."""
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1x1, depthwise 3x3, project 1x1; residual when shapes match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        if self.use_res_connect:  # fixed at construction: traceable
            return x + self.conv(x)
        return self.conv(x)


class MobileNet(nn.Module):
    """Stem, one residual InvertedResidual (8 -> 8), one plain one (8 -> 16, stride 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6()
        )
        self.features = nn.Sequential(InvertedResidual(8, 8, 1, 3), InvertedResidual(8, 16, 2, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify a [B, 3, 16, 16] image batch."""
        x = self.features(self.stem(x))
        return self.fc(self.pool(x).flatten(1))


class DenseLayer(nn.Module):
    """BN-ReLU-Conv3x3 whose ``growth`` output channels are concatenated to its input."""

    def __init__(self, in_channels: int, growth: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_channels, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``cat([x, conv(relu(norm(x)))], 1)``."""
        return torch.cat([x, self.conv(self.relu(self.norm(x)))], 1)


class DenseNet(nn.Module):
    """Stem, a dense block 8 -> 12 -> 16 channels, a transition to 8, and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dense = nn.Sequential(DenseLayer(8, 4), DenseLayer(12, 4))
        self.transition = nn.Sequential(
            nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1, bias=False), nn.AvgPool2d(2)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify a [B, 3, 16, 16] image batch."""
        x = self.transition(self.dense(self.stem(x)))
        return self.fc(self.pool(x).flatten(1))


def _conv1d() -> nn.Module:
    """A plain ``nn.Sequential`` 1-d CNN that flattens with an ``nn.Flatten`` module."""
    return nn.Sequential(
        nn.Conv1d(2, 8, 5, padding=2),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Conv1d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(1),
        nn.Linear(16, 4),
    )


class TinyTransformer(nn.Module):
    """Token embedding plus learned positions, a hand-written pre-norm encoder block, mean pool."""

    def __init__(self, vocab: int = 50, length: int = 12, dim: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, length, dim) * 0.02)
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * dim, dim)
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Classify int64 tokens [B, 12]."""
        x = self.embed(tokens) + self.pos
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.fc2(self.act(self.fc1(self.ln2(x))))
        x = self.ln_f(x)
        return self.head(x.mean(1))


# ----------------------------------------------------------------------------- registry

_IMAGE = _randn_inputs(3, 16, 16)

ZOO: dict[str, ZooCase] = {
    case.name: case
    for case in (
        ZooCase(
            name="mlp",
            build=_mlp,
            inputs=_randn_inputs(16),
            target=_class_targets(5),
            widen=("0", "4"),
            narrow=("0", "4"),
            deepen=("0", "4"),
            # same width 32; same width 24; 32 -> 24 needs a projection
            skips=(("0", "4"), ("4", "6"), ("0", "6")),
            blocks=(),
            no_shortcut_blocks=(),
            has_norm=True,
            widen_uniform_only=("0",),  # "0" feeds LayerNorm(32)
        ),
        ZooCase(
            name="vgg",
            build=VGG,
            inputs=_IMAGE,
            target=_class_targets(10),
            widen=("features.0", "features.4", "classifier.0"),
            narrow=("features.0", "features.4", "classifier.0"),
            deepen=("features.0", "features.4", "classifier.0"),
            # [8,16,16] -> [8,8,8] needs pooling; [32] -> [32] matches
            skips=(("features.0", "features.4"), ("classifier.0", "classifier.2")),
            blocks=(),
            no_shortcut_blocks=("features", "classifier"),
            has_norm=True,
        ),
        ZooCase(
            name="resnet",
            build=ResNet,
            inputs=_IMAGE,
            target=_class_targets(10),
            # stem.0 and layer1.0.conv2 are coupled through layer1.0's identity shortcut
            widen=(
                "stem.0",
                "layer1.0.conv1",
                "layer1.1.conv1",
                "layer2.0.conv1",
                "layer2.0.conv2",
            ),
            narrow=(
                "stem.0",
                "layer1.0.conv1",
                "layer1.1.conv1",
                "layer2.0.conv1",
                "layer2.0.conv2",
            ),
            deepen=("stem.0", "layer1.0.conv1", "layer2.0.conv2"),
            # [8,16,16] -> [8,16,16] matches; [8,16,16] -> [16,8,8] needs projection and pooling
            skips=(("layer1.0.conv1", "layer1.0.conv2"), ("stem.0", "layer2.0.conv1")),
            blocks=("layer1.0", "layer1.1", "layer2.0"),
            no_shortcut_blocks=("stem",),
            has_norm=True,
        ),
        ZooCase(
            name="mobilenet",
            build=MobileNet,
            inputs=_IMAGE,
            target=_class_targets(10),
            # stem.0 is coupled with features.0.conv.6 through the residual add;
            # features.0.conv.0 drags the depthwise features.0.conv.3 (groups) along
            widen=("stem.0", "features.0.conv.0", "features.1.conv.0", "features.1.conv.6"),
            narrow=("stem.0", "features.0.conv.0", "features.1.conv.0", "features.1.conv.6"),
            deepen=("stem.0", "features.0.conv.0", "features.0.conv.3", "features.1.conv.6"),
            # [8,16,16] -> [8,16,16] matches; [24,16,16] -> [16,8,8] needs projection and pooling
            skips=(("stem.0", "features.1.conv.0"), ("features.0.conv.3", "features.1.conv.6")),
            blocks=("features.0",),
            no_shortcut_blocks=("features.1", "stem"),
            has_norm=True,
        ),
        ZooCase(
            name="densenet",
            build=DenseNet,
            inputs=_IMAGE,
            target=_class_targets(10),
            # widening stem or dense.0.conv shifts the concatenated channels after it
            widen=("stem", "dense.0.conv", "dense.1.conv", "transition.2"),
            narrow=("stem", "dense.0.conv", "dense.1.conv", "transition.2"),
            deepen=("stem", "dense.0.conv", "transition.2"),
            # [8,16,16] -> [16,16,16] and [4,16,16] -> [12,16,16]: channel projections
            skips=(("stem", "transition.2"), ("dense.0.conv", "dense.1.conv")),
            blocks=(),
            no_shortcut_blocks=("dense.0", "dense.1", "transition"),
            has_norm=True,
        ),
        ZooCase(
            name="conv1d",
            build=_conv1d,
            inputs=_randn_inputs(2, 32),
            target=_class_targets(4),
            widen=("0", "3"),
            narrow=("0", "3"),
            deepen=("0", "3"),
            skips=(("0", "3"),),  # [8,32] -> [8,32] matches
            blocks=(),
            no_shortcut_blocks=(),
            has_norm=True,
        ),
        ZooCase(
            name="transformer",
            build=TinyTransformer,
            inputs=_token_inputs(50, 12),
            target=_class_targets(5),
            # embed is the model dimension: coupled with pos, both residual adds, all
            # LayerNorms, attention in/out projections, fc2 and head
            widen=("fc1", "embed"),
            narrow=("fc1", "embed"),
            deepen=("fc1",),
            # [12,16] -> [12,16] matches; [12,16] -> [16] needs pooling over the sequence
            skips=(("embed", "fc1"), ("embed", "head")),
            blocks=(),
            no_shortcut_blocks=(),
            has_norm=True,
            widen_uniform_only=("embed",),
        ),
    )
}


def list_cases() -> list[str]:
    """Names of all zoo cases, in registration order."""
    return list(ZOO)


def get_case(name: str) -> ZooCase:
    """Return the zoo case called ``name``; an unknown name lists the known ones."""
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo case {name!r}; known cases: {', '.join(ZOO)}") from None
