"""Hypothesis strategies for random tiny CNNs and MLPs, built from plain-dict specs.

Each example is a :class:`RandomCase` whose ``description`` is the spec, so a failing example
reads as the architecture that broke. The models are generic modules driven by the spec, so they
stay traceable by ``torch.fx.symbolic_trace`` (all branching is on attributes fixed at build).

Example:
    >>> from hypothesis import given
    >>> @given(random_cnns())
    ... def test_runs(case: RandomCase) -> None:
    ...     case.model.eval()(*case.inputs)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn

__all__ = ["RandomCase", "SpecCNN", "SpecMLP", "random_cnns", "random_mlps"]

Spec = list[dict[str, Any]]

BATCH = 3  # batch size of every example input
IMAGE = 8  # height and width of example images
_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
}


@dataclass(frozen=True)
class RandomCase:
    """A random model, its example inputs and the layers each edit may target."""

    model: nn.Module  # built in training mode; call .eval() before comparing outputs
    inputs: tuple[torch.Tensor, ...]  # example inputs, batch BATCH
    widen: tuple[str, ...]  # producers whose output units can be widened (never the output layer)
    narrow: tuple[str, ...]  # producers whose output units can be removed (all have >= 2 units)
    deepen: tuple[str, ...]  # Conv/Linear after which an identity layer can be inserted
    description: str  # the spec, for failure messages
    widen_uniform_only: tuple[str, ...] = field(default=())  # widen names that feed a LayerNorm


# ----------------------------------------------------------------------------- CNN


class PlainStage(nn.Module):
    """Conv3x3 - optional BN - ReLU - optional MaxPool2d(2)."""

    def __init__(self, in_ch: int, out_ch: int, bn: bool, pool: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.bn = nn.BatchNorm2d(out_ch) if bn else None
        self.pool = nn.MaxPool2d(2) if pool else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the stage."""
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        x = torch.relu(x)
        return x if self.pool is None else self.pool(x)


class ResidualStage(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; shortcut: identity or 1x1 conv."""

    def __init__(self, in_ch: int, out_ch: int, projection: bool, pool: bool) -> None:
        super().__init__()
        if in_ch != out_ch and not projection:
            raise ValueError(f"identity shortcut needs in_ch == out_ch, got {in_ch} and {out_ch}")
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1, bias=False) if projection else None
        self.pool = nn.MaxPool2d(2) if pool else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block, then the optional pooling."""
        identity = x if self.shortcut is None else self.shortcut(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)) + identity)
        return out if self.pool is None else self.pool(out)


class ConcatStage(nn.Module):
    """``cat([x, relu(conv(x))], 1)``: adds ``growth`` channels."""

    def __init__(self, in_ch: int, growth: int, pool: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, growth, 3, padding=1)
        self.pool = nn.MaxPool2d(2) if pool else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the stage."""
        x = torch.cat([x, torch.relu(self.conv(x))], 1)
        return x if self.pool is None else self.pool(x)


class SpecCNN(nn.Module):
    """A CNN built from a spec: stage dicts, one flatten dict, then linear dicts.

    Stage dicts: ``{"kind": "plain", "out": c, "bn": b, "pool": p}``,
    ``{"kind": "residual", "out": c, "projection": b, "pool": p}``,
    ``{"kind": "concat", "growth": g, "pool": p}``; then ``{"kind": "flatten", "mode": "view" |
    "flatten"}`` and ``{"kind": "linear", "out": n}`` (ReLU between linears).
    """

    def __init__(self, in_channels: int, spec: Spec, image: int = IMAGE) -> None:
        super().__init__()
        self.stages = nn.ModuleList()
        self.head = nn.ModuleList()
        self.flatten_mode = "flatten"
        channels, size = in_channels, image
        for entry in spec:
            kind = entry["kind"]
            if kind == "flatten":
                self.flatten_mode = entry["mode"]
                channels = channels * size * size
            elif kind == "linear":
                self.head.append(nn.Linear(channels, entry["out"]))
                channels = entry["out"]
            else:
                stage, channels = _build_stage(channels, entry)
                self.stages.append(stage)
                size = size // 2 if entry["pool"] else size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the stages, flatten, and the linear head."""
        for stage in self.stages:
            x = stage(x)
        x = x.view(x.size(0), -1) if self.flatten_mode == "view" else x.flatten(1)
        for i, fc in enumerate(self.head):
            x = fc(x)
            if i < len(self.head) - 1:
                x = torch.relu(x)
        return x


def _build_stage(in_ch: int, entry: dict[str, Any]) -> tuple[nn.Module, int]:
    """Build one stage from its spec entry; return it and its output channels."""
    kind = entry["kind"]
    if kind == "plain":
        return PlainStage(in_ch, entry["out"], entry["bn"], entry["pool"]), entry["out"]
    if kind == "residual":
        return ResidualStage(in_ch, entry["out"], entry["projection"], entry["pool"]), entry["out"]
    if kind == "concat":
        return ConcatStage(in_ch, entry["growth"], entry["pool"]), in_ch + entry["growth"]
    raise ValueError(f"unknown stage kind {kind!r}; valid kinds: plain, residual, concat")


def _cnn_edit_names(spec: Spec, num_linears: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Return (widen/narrow names, deepen names) for a SpecCNN spec.

    The conv2 of an identity residual stage is coupled with whatever produced the stage's input;
    when that still includes raw input channels (no conv in between) it cannot change width.
    """
    resizable: list[str] = []
    deepenable: list[str] = []
    raw_input = True  # the current feature map contains the model's input channels
    stages = [entry for entry in spec if entry["kind"] in ("plain", "residual", "concat")]
    for i, entry in enumerate(stages):
        if entry["kind"] == "residual":
            convs = [f"stages.{i}.conv1", f"stages.{i}.conv2"]
            coupled_to_input = raw_input and not entry["projection"]
            resizable += convs[:1] if coupled_to_input else convs
            raw_input = coupled_to_input
        else:
            convs = [f"stages.{i}.conv"]
            resizable += convs
            raw_input = raw_input and entry["kind"] == "concat"
        deepenable += convs
    hidden = [f"head.{i}" for i in range(num_linears - 1)]
    return tuple(resizable + hidden), tuple(deepenable + hidden)


@st.composite
def random_cnns(draw: st.DrawFn) -> RandomCase:
    """Draw a tiny random CNN on [3, C, 8, 8] inputs: 1-4 stages, flatten, 1-2 linears."""
    in_channels = draw(st.integers(1, 3))
    channels_st = st.integers(2, 12)
    spec: Spec = []
    channels, size = in_channels, IMAGE
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["plain", "residual", "concat"]))
        pool = size >= 2 and draw(st.booleans())
        if kind == "plain":
            entry = {
                "kind": kind,
                "out": draw(channels_st),
                "bn": draw(st.booleans()),
                "pool": pool,
            }
        elif kind == "residual":
            out = draw(channels_st)
            projection = out != channels or draw(st.booleans())
            entry = {"kind": kind, "out": out, "projection": projection, "pool": pool}
        else:
            entry = {"kind": kind, "growth": draw(st.integers(2, 6)), "pool": pool}
        spec.append(entry)
        channels = entry["out"] if "out" in entry else channels + entry["growth"]
        size = size // 2 if pool else size
    spec.append({"kind": "flatten", "mode": draw(st.sampled_from(["view", "flatten"]))})
    widths = [*draw(st.lists(st.integers(2, 12), max_size=1)), draw(st.integers(2, 5))]
    spec += [{"kind": "linear", "out": w} for w in widths]
    model = SpecCNN(in_channels, spec)
    resizable, deepenable = _cnn_edit_names(spec, len(widths))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    inputs = (torch.randn(BATCH, in_channels, IMAGE, IMAGE, generator=gen),)
    description = f"SpecCNN(in_channels={in_channels}, spec={spec})"
    return RandomCase(model, inputs, resizable, resizable, deepenable, description)


# ----------------------------------------------------------------------------- MLP


class SpecMLP(nn.Module):
    """An MLP built from a spec of plain dicts.

    Entries: ``{"kind": "linear", "out": n}``, ``{"kind": "norm"}`` (LayerNorm),
    ``{"kind": "dropout", "p": p}``, ``{"kind": "act", "fn": "relu" | "gelu" | "tanh" | "silu"}``.
    """

    def __init__(self, in_features: int, spec: Spec) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        features = in_features
        for entry in spec:
            kind = entry["kind"]
            if kind == "linear":
                layers.append(nn.Linear(features, entry["out"]))
                features = entry["out"]
            elif kind == "norm":
                layers.append(nn.LayerNorm(features))
            elif kind == "dropout":
                layers.append(nn.Dropout(entry["p"]))
            elif kind == "act":
                layers.append(_ACTIVATIONS[entry["fn"]]())
            else:
                raise ValueError(
                    f"unknown layer kind {kind!r}; valid kinds: linear, norm, dropout, act"
                )
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layers."""
        return self.layers(x)


@st.composite
def random_mlps(draw: st.DrawFn) -> RandomCase:
    """Draw a tiny random MLP on [3, F] inputs: 1-4 Linear layers with optional norm/dropout/act."""
    in_features = draw(st.integers(2, 12))
    depth = draw(st.integers(1, 4))
    spec: Spec = []
    for i in range(depth):
        spec.append({"kind": "linear", "out": draw(st.integers(2, 12))})
        if i == depth - 1:
            break
        if draw(st.booleans()):
            spec.append({"kind": "norm"})
        spec.append({"kind": "act", "fn": draw(st.sampled_from(sorted(_ACTIVATIONS)))})
        if draw(st.booleans()):
            spec.append({"kind": "dropout", "p": 0.1})
    model = SpecMLP(in_features, spec)
    hidden, normed = _mlp_edit_names(spec)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    inputs = (torch.randn(BATCH, in_features, generator=gen),)
    description = f"SpecMLP(in_features={in_features}, spec={spec})"
    return RandomCase(model, inputs, hidden, hidden, hidden, description, widen_uniform_only=normed)


def _mlp_edit_names(spec: Spec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Return (hidden Linear names, those directly followed by a LayerNorm) for a SpecMLP spec."""
    linears = [i for i, entry in enumerate(spec) if entry["kind"] == "linear"]
    hidden = linears[:-1]
    normed = [i for i in hidden if spec[i + 1]["kind"] == "norm"]
    return tuple(f"layers.{i}" for i in hidden), tuple(f"layers.{i}" for i in normed)
