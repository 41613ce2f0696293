"""Handlers for the layers of ``torch.nn`` (registered when :mod:`neuroexapt.graph` loads)."""

from __future__ import annotations

from torch import fx, nn

from neuroexapt.graph.context import BuildContext, NodeLayout
from neuroexapt.graph.groups import Member
from neuroexapt.graph.handlers import (
    ElementwiseHandler,
    PerUnitHandler,
    ProducerHandler,
    register_handler,
)
from neuroexapt.graph.layout import Layout
from neuroexapt.graph.rules import flatten_layout

__all__ = ["register_builtin_handlers"]


class ConvHandler(ProducerHandler):
    """Conv1d/2d/3d: plain (groups=1), depthwise (groups=in_channels) or grouped."""

    def __init__(self) -> None:
        super().__init__(
            [("weight", 1)], [("weight", 0), ("bias", 0)], "in_channels", "out_channels", 1
        )

    def propagate(
        self, ctx: BuildContext, node: fx.Node, module: nn.Module, name: str
    ) -> NodeLayout:
        assert isinstance(module, nn.modules.conv._ConvNd)
        if module.groups == 1:
            return super().propagate(ctx, node, module, name)
        lay = self.check_input(ctx, ctx.layout_of(node.args[0]), 1, name)
        if module.groups == module.in_channels:
            return self._depthwise(ctx, module, name, lay, node)
        if lay is not None:  # each input channel feeds one group's slice of the weight
            ctx.freeze([lay], f"grouped convolution '{name}' (groups={module.groups}) reads "
                       "these channels group by group; its input channels cannot be resized",
                       name)
        # its output channels form `groups` equal segments: resized alike in each
        out = self.output(ctx, node, module, name)
        for gid in out.gids:
            ctx.groups.constrain(gid, module.groups)
        return out

    def _depthwise(
        self,
        ctx: BuildContext,
        module: nn.modules.conv._ConvNd,
        name: str,
        lay: Layout | None,
        node: fx.Node,
    ) -> NodeLayout:
        if lay is None:
            # its channels are its input's, which the tracer cannot follow (the model's input,
            # a frozen reshape, an operation without a rule): resizing them alone would break
            # the layer, so they stay as they are
            out = self.output(ctx, node, module, name)
            ctx.freeze([out], f"depthwise convolution '{name}' has as many channels as its "
                       "input, which comes from where units cannot be resized", name)
            return out
        mult = module.out_channels // module.in_channels
        out = lay.scaled(mult)
        ctx.consume(out, name, "weight", 0, "pass")
        if module.bias is not None:
            ctx.consume(out, name, "bias", 0, "pass")
        return out

    def sync(self, module: nn.Module, sizes: dict[Member, int]) -> None:
        assert isinstance(module, nn.modules.conv._ConvNd)
        depthwise = module.groups == module.in_channels and module.groups > 1
        if not depthwise:
            for member, size in sizes.items():
                if member.role == "out":
                    module.out_channels = size
                elif member.role == "in":
                    module.in_channels = size * module.groups
            return
        mult = module.out_channels // module.in_channels
        size = next(iter(sizes.values()))
        module.out_channels = size
        module.in_channels = module.groups = size // mult


class ConvTransposeHandler(ProducerHandler):
    """ConvTranspose1d/2d/3d with groups=1 (weight is [in, out, ...])."""

    def __init__(self) -> None:
        super().__init__(
            [("weight", 0)], [("weight", 1), ("bias", 0)], "in_channels", "out_channels", 1
        )

    def propagate(
        self, ctx: BuildContext, node: fx.Node, module: nn.Module, name: str
    ) -> NodeLayout:
        out = super().propagate(ctx, node, module, name)
        if getattr(module, "groups", 1) != 1:
            reason = f"grouped transposed convolution '{name}' cannot be resized"
            ctx.freeze(
                [lay for lay in (ctx.layout_of(node.args[0]), out) if isinstance(lay, Layout)],
                reason,
                name,
            )
        return out


class EmbeddingHandler(ProducerHandler):
    """Embedding: produces ``embedding_dim`` units from indices."""

    def __init__(self) -> None:
        super().__init__([], [("weight", 1)], None, "embedding_dim", -1)

    def propagate(
        self, ctx: BuildContext, node: fx.Node, module: nn.Module, name: str
    ) -> NodeLayout:
        out = self.output(ctx, node, module, name)
        if getattr(module, "max_norm", None) is not None:
            ctx.freeze([out], f"Embedding '{name}' renormalises rows (max_norm)", name)
        return out


class LayerNormHandler(PerUnitHandler):
    """LayerNorm / RMSNorm over the last dimension only."""

    def propagate(
        self, ctx: BuildContext, node: fx.Node, module: nn.Module, name: str
    ) -> NodeLayout:
        if len(module.normalized_shape) != 1:
            lay = ctx.layout_of(node.args[0])
            if lay is not None:
                ctx.freeze([lay], f"'{name}' normalises over several dimensions", name)
            return None
        return super().propagate(ctx, node, module, name)


class PReLUHandler(PerUnitHandler):
    """PReLU: one slope per channel when ``num_parameters > 1``."""

    def __init__(self) -> None:
        super().__init__([("weight", 0)], "num_parameters", 1)

    def propagate(
        self, ctx: BuildContext, node: fx.Node, module: nn.Module, name: str
    ) -> NodeLayout:
        if module.num_parameters == 1:
            return ctx.layout_of(node.args[0])
        return super().propagate(ctx, node, module, name)


class SoftmaxHandler(ElementwiseHandler):
    """Softmax-like layers: element-wise unless they normalise across the units."""

    keeps_heads = True

    def propagate(
        self, ctx: BuildContext, node: fx.Node, module: nn.Module, name: str
    ) -> NodeLayout:
        lay = ctx.layout_of(node.args[0])
        dim = getattr(module, "dim", None)
        if lay is not None and (dim is None or dim % lay.ndim == lay.dim):
            ctx.freeze([lay], f"'{name}' normalises across the units", name)
            return None
        return lay


class FlattenHandler(ElementwiseHandler):
    """nn.Flatten: one unit becomes a block of consecutive features."""

    keeps_heads = True

    def propagate(
        self, ctx: BuildContext, node: fx.Node, module: nn.Module, name: str
    ) -> NodeLayout:
        assert isinstance(module, nn.Flatten)
        return flatten_layout(ctx, node, node.args[0], module.start_dim, module.end_dim)


_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.SELU,
    nn.CELU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Threshold, nn.Identity, nn.Dropout, nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_CHANNELWISE = (
    nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.LPPool1d, nn.LPPool2d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
    nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
)
_NORM_STATS = [("weight", 0), ("bias", 0), ("running_mean", 0), ("running_var", 0)]


def register_builtin_handlers() -> None:
    """Register the handlers of every supported ``torch.nn`` layer."""
    from neuroexapt.graph.attention import MultiheadAttentionHandler

    for cls in _ELEMENTWISE:
        register_handler(cls, ElementwiseHandler())
    for cls in _CHANNELWISE:
        register_handler(cls, ElementwiseHandler(feature_dim=1))
    for cls in (nn.Softmax, nn.LogSoftmax, nn.Softmin):
        register_handler(cls, SoftmaxHandler())
    register_handler(nn.Flatten, FlattenHandler())
    for conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        register_handler(conv, ConvHandler())
    for convt in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
        register_handler(convt, ConvTransposeHandler())
    register_handler(
        nn.Linear,
        ProducerHandler(
            [("weight", 1)], [("weight", 0), ("bias", 0)], "in_features", "out_features", -1
        ),
    )
    register_handler(nn.Embedding, EmbeddingHandler())
    for bn in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
               nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
        register_handler(bn, PerUnitHandler(_NORM_STATS, "num_features", 1))
    register_handler(
        nn.LayerNorm,
        LayerNormHandler([("weight", 0), ("bias", 0)], "normalized_shape", -1,
                         normalizes=True, tuple_size=True),
    )
    register_handler(
        nn.RMSNorm,
        LayerNormHandler([("weight", 0)], "normalized_shape", -1,
                         normalizes=True, tuple_size=True),
    )
    register_handler(
        nn.GroupNorm,
        PerUnitHandler([("weight", 0), ("bias", 0)], "num_channels", 1,
                       segments_attr="num_groups", normalizes=True),
    )
    register_handler(nn.PReLU, PReLUHandler())
    register_handler(nn.MultiheadAttention, MultiheadAttentionHandler())
