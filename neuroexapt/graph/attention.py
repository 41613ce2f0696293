"""nn.MultiheadAttention: its model dimension is both read and produced.

PyTorch requires the query, key, value and output dimensions and the internal projection
dimension to equal ``embed_dim``. Resizing the model dimension therefore also resizes every
head. Widening keeps the function: new query rows are zero (scores unchanged), new key rows are
random, new value rows are random with zero output-projection columns, and the old query rows
are scaled by ``sqrt(new_head_dim / old_head_dim)`` to undo the change of the softmax
temperature. Narrowing keeps, in every head, the query/key and value dimensions with the
largest weight products (this changes the function: it is pruning).
"""

from __future__ import annotations

import math

import torch
from torch import fx, nn

from neuroexapt.errors import SurgeryError
from neuroexapt.graph.context import BuildContext, NodeLayout
from neuroexapt.graph.groups import Member
from neuroexapt.graph.handlers import ModuleHandler
from neuroexapt.graph.plan import TensorUpdate, UnitPlan, along, take_index
from neuroexapt.optim.parammap import DimMap

__all__ = ["MultiheadAttentionHandler"]


class MultiheadAttentionHandler(ModuleHandler):
    """Couples query/key/value inputs and the output of an attention layer into one group."""

    def propagate(
        self, ctx: BuildContext, node: fx.Node, module: nn.Module, name: str
    ) -> NodeLayout:
        assert isinstance(module, nn.MultiheadAttention)
        args = list(node.args) + [None] * 3
        inputs = [args[i] if args[i] is not None else node.kwargs.get(k)
                  for i, k in enumerate(("query", "key", "value"))]
        layouts = [ctx.layout_of(a) for a in inputs]
        shape = ctx.shape_of(inputs[0])
        ndim = len(shape) if shape else 3
        present = [lay for lay in layouts if lay is not None]
        reason = None
        if not module._qkv_same_embed_dim:
            reason = f"'{name}' has kdim/vdim different from embed_dim"
        elif len(present) != 3:
            reason = f"'{name}' reads query, key or value from a fixed-size tensor"
        elif any(lay.dim != ndim - 1 or lay.single is None for lay in present):
            reason = f"'{name}' reads its units from a concatenation or a non-last dim"
        merged = None if reason else ctx.merge(present, f"'{name}'")
        if merged is None:
            ctx.freeze(present, reason or f"'{name}' reads misaligned groups", name)
            gid = ctx.groups.new(module.embed_dim, name)
            ctx.groups.freeze(gid, reason or "misaligned attention inputs", name)
            out = ctx.layout_of(inputs[0]) or None
            return (out, None)
        ctx.consume(merged, name, "attention", ndim - 1, "custom")
        return (merged, None)

    def sync(self, module: nn.Module, sizes: dict[Member, int]) -> None:
        assert isinstance(module, nn.MultiheadAttention)
        size = next(iter(sizes.values()))
        module.embed_dim = module.kdim = module.vdim = size
        module.head_dim = size // module.num_heads

    @staticmethod
    def check(module: nn.Module, name: str, new_size: int) -> None:
        """Refuse sizes that heads cannot share equally."""
        assert isinstance(module, nn.MultiheadAttention)
        if new_size % module.num_heads:
            raise SurgeryError(
                f"MultiheadAttention '{name}' has {module.num_heads} heads: the model dimension "
                f"must stay divisible by {module.num_heads}, got {new_size}; change it by a "
                f"multiple of {module.num_heads}"
            )

    def resize_custom(self, module: nn.Module, name: str, plan: UnitPlan) -> list[TensorUpdate]:
        """New tensors of the attention layer for ``plan`` on its model dimension."""
        assert isinstance(module, nn.MultiheadAttention)
        self.check(module, name, plan.new_size)
        heads, old_hd = module.num_heads, module.head_dim
        new_hd = plan.new_size // heads
        w = module.in_proj_weight.detach()
        q, k, v = w.chunk(3, 0)
        qk_map = _head_map(heads, old_hd, new_hd, (q.norm(dim=1) * k.norm(dim=1)))
        ov = module.out_proj.weight.detach().norm(dim=0)
        v_map = _head_map(heads, old_hd, new_hd, v.norm(dim=1) * ov)
        rows = torch.cat([qk_map, qk_map + module.embed_dim, v_map + 2 * module.embed_dim])
        rows = torch.where(torch.cat([qk_map, qk_map, v_map]) < 0, -1, rows)
        temp = math.sqrt(new_hd / old_hd)
        row_scale = torch.ones(rows.numel(), dtype=torch.float64)
        row_scale[: plan.new_size] = temp
        ups = [_in_proj(module.in_proj_weight, rows, row_scale, plan, fill_k=True)]
        if module.in_proj_bias is not None:
            ups.append(_rows(module.in_proj_bias, "in_proj_bias", rows, row_scale))
        for attr, mapping in (("bias_k", qk_map), ("bias_v", v_map)):
            tensor = getattr(module, attr)
            if tensor is not None:
                ups.append(_rows(tensor, attr, mapping, None, dim=2))
        ups.extend(_out_proj(module.out_proj, v_map, plan))
        return ups


def _head_map(heads: int, old: int, new: int, score: torch.Tensor) -> torch.Tensor:
    """Old internal dimension kept at each new position (-1: fresh), head by head."""
    parts = []
    for h in range(heads):
        base = torch.arange(h * old, (h + 1) * old)
        if new >= old:
            parts.append(torch.cat([base, torch.full((new - old,), -1)]))
        else:
            top = score[base].topk(new).indices.sort().values
            parts.append(base[top])
    return torch.cat(parts)


def _scale(t: torch.Tensor, dim: int, scale: torch.Tensor) -> torch.Tensor:
    return t * along(t, dim, scale)


def _rows(
    t: torch.Tensor, attr: str, rows: torch.Tensor, scale: torch.Tensor | None, dim: int = 0
) -> TensorUpdate:
    new = take_index(t.detach(), dim, rows)
    if scale is not None:
        new = _scale(new, dim, scale)
    return TensorUpdate(attr, new, (DimMap(dim, rows, scale),))


def _in_proj(
    weight: torch.Tensor, rows: torch.Tensor, row_scale: torch.Tensor, plan: UnitPlan,
    fill_k: bool,
) -> TensorUpdate:
    w = _scale(take_index(weight.detach(), 0, rows), 0, row_scale)
    cols = torch.where(plan.fresh, -1, plan.index)
    w = _scale(take_index(w, 1, cols), 1, plan.scale)
    third = rows.numel() // 3
    fresh_rows = (rows < 0).nonzero().flatten()
    k_fresh = fresh_rows[fresh_rows >= third]  # new key and value rows start random
    if fill_k and k_fresh.numel():
        std = weight.detach().std().item() or 1.0
        noise = torch.randn(k_fresh.numel(), w.shape[1], dtype=w.dtype, device=w.device) * std
        w = w.index_copy(0, k_fresh.to(w.device), noise)
    dims = (DimMap(0, rows, row_scale), DimMap(1, cols, plan.scale))
    return TensorUpdate("in_proj_weight", w, dims)


def _out_proj(out_proj: nn.Linear, v_map: torch.Tensor, plan: UnitPlan) -> list[TensorUpdate]:
    w = take_index(out_proj.weight.detach(), 1, v_map)
    rows = torch.where(plan.fresh, -1, plan.index)
    w = take_index(w, 0, rows)
    fresh = plan.fresh.nonzero().flatten().to(w.device)
    if fresh.numel():  # fresh output units get random incoming weights
        std = out_proj.weight.detach().std().item() or 1.0
        w = w.index_copy(0, fresh, torch.randn(fresh.numel(), w.shape[1], dtype=w.dtype,
                                                device=w.device) * std)
    ups = [TensorUpdate("out_proj.weight", w, (DimMap(1, v_map, None), DimMap(0, rows, None)))]
    if out_proj.bias is not None:
        ups.append(_rows(out_proj.bias, "out_proj.bias", rows, None))
    return ups
