"""Layout rules of attention written with tensor ops (Hugging Face, timm, users' own).

``q = self.q(x).view(b, s, -1, d).transpose(1, 2)`` splits the query units into heads
(:func:`neuroexapt.graph.rules` follows the reshape). Attention then couples the heads: head
``h`` of the queries meets head ``h`` of the keys (``q @ k.T``, a sum over the positions inside
the head) and its weights mix head ``h`` of the values. The query, key and value units are
therefore one group that changes by whole heads: a copied head (queries, keys and values
copied, the output projection's columns halved) or a fresh one (zero output columns) keeps
the function, and removing a head removes it everywhere. Grouped-query attention (fewer key
and value heads than query heads) and per-head masks or biases are refused.
"""

from __future__ import annotations

from torch import fx

from neuroexapt.graph.context import BuildContext, NodeLayout
from neuroexapt.graph.layout import Layout
from neuroexapt.graph.nodes import arg, unknown

__all__ = ["matmul_rule", "sdpa_rule"]


def _per_head(ctx: BuildContext, tensor: object, ref: Layout) -> bool:
    """True when ``tensor`` (a mask or bias without units) differs from head to head."""
    shape = ctx.shape_of(tensor)
    if shape is None:
        return False
    dim = ref.dim - (ref.ndim - len(shape))
    return dim >= 0 and shape[dim] != 1


def sdpa_rule(ctx: BuildContext, node: fx.Node) -> NodeLayout:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, ...)`` on tensors split into
    heads ``[..., heads, length, head_dim]``: the output follows the values' heads."""
    tensors = [arg(node, i, key) for i, key in enumerate(("query", "key", "value"))]
    layouts = [ctx.layout_of(t) for t in tensors]
    if all(lay is None for lay in layouts):
        return None
    mask = arg(node, 3, "attn_mask")
    shapes = [ctx.shape_of(t) for t in tensors]
    reason = None
    if any(lay is None or not lay.heads for lay in layouts):
        reason = "'scaled_dot_product_attention' on a tensor not split into heads"
    elif any(lay.dim != lay.ndim - 3 or lay.inner != lay.ndim - 1
             for lay in layouts if lay is not None):
        reason = "'scaled_dot_product_attention' with heads on unexpected dims"
    elif any(s is None for s in shapes) or len({s[-3] for s in shapes if s}) != 1:
        reason = ("grouped-query attention (fewer key/value heads than query heads) in "
                  "'scaled_dot_product_attention'")
    elif ctx.layouts_in(mask) or (layouts[0] is not None and _per_head(ctx, mask, layouts[0])):
        reason = "'scaled_dot_product_attention' with a mask that differs per head"
    merged = None if reason else ctx.merge([lay for lay in layouts if lay is not None],
                                           f"node '{node.name}'")
    if merged is None:
        return unknown(ctx, node, reason or "attention heads of different sizes", opaque=False)
    value = layouts[2]
    assert value is not None
    return value


def matmul_rule(ctx: BuildContext, node: fx.Node) -> NodeLayout:
    """``torch.matmul`` inside attention: ``q @ k.transpose(-2, -1)`` (scores per head) and
    ``scores @ v`` (values mixed per head). Any other matmul on units is refused."""
    a, b = arg(node, 0, "input"), arg(node, 1, "other")
    la, lb = ctx.layout_of(a), ctx.layout_of(b)
    if la is None and lb is None:
        return None
    if la is None or lb is None or not la.heads or not lb.heads:
        return unknown(ctx, node, "'matmul' with the units", opaque=False)
    n = la.ndim
    same = lb.ndim == n and la.dim == lb.dim and la.dim < n - 2 and la.atom == lb.atom
    if same and la.inner == n - 1 and lb.inner == n - 2:
        inner = None  # q @ k.T: the positions inside each head are summed over
    elif same and la.inner is None and lb.inner == n - 1:
        inner = n - 1  # scores @ v: each head's values mixed by its own scores
    else:
        return unknown(ctx, node, "'matmul' that mixes attention heads", opaque=False)
    sa, sb = la.single, lb.single
    if sa is None or sb is None or sa.units != sb.units:
        return unknown(ctx, node, "'matmul' of attention heads of different sizes", opaque=False)
    assert sa.gid is not None and sb.gid is not None
    ctx.groups.union(sa.gid, sb.gid, f"node '{node.name}'")
    return Layout(la.dim, n, la.segments, la.atom, inner)
