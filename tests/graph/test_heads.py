"""Attention written with tensor ops: heads as units that change whole (issue 12)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.asserts import assert_same_function
from torch import nn

import neuroexapt
from neuroexapt.errors import SurgeryError

HEAD = 8


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Self-attention as users and Hugging Face write it: ``view(b, s, -1, head)``."""

    def __init__(self, dim: int = 32, heads: int = 4, *, sdpa: bool = False,
                 rotary: bool = False, fixed_heads: bool = False, mask: str | None = None,
                 kv_heads: int | None = None) -> None:
        super().__init__()
        kv = (kv_heads or heads) * HEAD
        self.q, self.k, self.v = nn.Linear(dim, heads * HEAD), nn.Linear(dim, kv), \
            nn.Linear(dim, kv)
        self.o = nn.Linear(heads * HEAD, dim)
        self.sdpa, self.rotary, self.fixed_heads, self.mask = sdpa, rotary, fixed_heads, mask
        self.heads = heads
        angle = torch.arange(16).view(16, 1) * torch.linspace(0.1, 1.0, HEAD)
        self.register_buffer("cos", angle.cos(), persistent=False)
        self.register_buffer("sin", angle.sin(), persistent=False)
        self.register_buffer("per_head", torch.randn(heads, 16, 16), persistent=False)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        heads = self.heads if self.fixed_heads else -1
        return x.view(b, s, heads, HEAD).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        if self.rotary:
            cos, sin = self.cos[:s], self.sin[:s]
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        mask = self.per_head[:, :s, :s] if self.mask == "per_head" else None
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                 enable_gqa=q.shape[1] != k.shape[1])
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(HEAD)
            out = scores.softmax(dim=-1) @ v
        return self.o(out.transpose(1, 2).reshape(b, s, -1))


class Block(nn.Module):
    def __init__(self, **kw: object) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 32)
        self.attn = Attention(**kw)  # type: ignore[arg-type]
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.head(self.norm(h + self.attn(h)).mean(1))


def _model(**kw: object) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return Block(**kw).eval(), torch.randn(2, 10, 6)


@pytest.mark.parametrize("kw", [{}, {"sdpa": True}, {"rotary": True},
                                {"rotary": True, "sdpa": True}])
def test_query_key_value_are_one_group_of_whole_heads(kw: dict[str, bool]) -> None:
    model, x = _model(**kw)
    group = neuroexapt.trace(model, x).group_of("attn.q")
    assert group.resizable, group.frozen
    assert group.atom == HEAD and group.size == 32
    assert {"attn.q", "attn.k", "attn.v"} <= set(group.producers)
    assert {m.module for m in group.members if m.role == "in"} == {"attn.o"}


@pytest.mark.parametrize("strategy", ["split", "zero"])
@pytest.mark.parametrize("kw", [{}, {"sdpa": True}, {"rotary": True}])
def test_adding_whole_heads_keeps_the_function(kw: dict[str, bool], strategy: str) -> None:
    model, x = _model(**kw)
    before = model(x)
    opt = torch.optim.Adam(model.parameters())
    neuroexapt.widen(model, "attn.k", 2 * HEAD, example_inputs=x, strategy=strategy,  # type: ignore[arg-type]
                     optimizer=opt, verify=True)
    assert model.attn.q.out_features == model.attn.v.out_features == 48
    assert model.attn.o.in_features == 48
    assert_same_function(before, model(x), x)
    model.train()
    model(x).sum().backward()
    opt.step()


def test_copies_of_one_head_stay_whole() -> None:
    model, x = _model()
    before = model(x)
    head1 = list(range(HEAD, 2 * HEAD))
    neuroexapt.widen(model, "attn.q", 2 * HEAD, units=head1 * 2, example_inputs=x, verify=True)
    q = model.attn.q.weight.detach()
    for copy in (4, 5):
        assert torch.equal(q[copy * HEAD : (copy + 1) * HEAD], q[HEAD : 2 * HEAD])
    assert_same_function(before, model(x), x)


def test_removing_a_head_removes_it_from_queries_keys_values_and_output() -> None:
    model, x = _model(sdpa=True)
    with torch.no_grad():
        for lin in (model.attn.q, model.attn.k, model.attn.v):
            lin.weight[2 * HEAD : 3 * HEAD] *= 1e-3  # head 2 is the weakest
    kept_o = torch.cat([model.attn.o.weight[:, : 2 * HEAD], model.attn.o.weight[:, 3 * HEAD :]],
                       1).detach().clone()
    neuroexapt.narrow(model, "attn.v", remove=HEAD, example_inputs=x)
    assert model.attn.q.out_features == model.attn.k.out_features == 24
    assert torch.equal(model.attn.o.weight.detach(), kept_o)
    assert model(x).shape == (2, 3)


@pytest.mark.parametrize("edit", [
    lambda m, x: neuroexapt.widen(m, "attn.q", 3, example_inputs=x),
    lambda m, x: neuroexapt.narrow(m, "attn.q", remove=[0, 1], example_inputs=x),
    lambda m, x: neuroexapt.narrow(m, "attn.q", remove=5, example_inputs=x),
    lambda m, x: neuroexapt.widen(m, "attn.q", HEAD, units=list(range(4, 12)), example_inputs=x),
])
def test_splitting_a_head_is_refused_with_nothing_changed(edit: object) -> None:
    model, x = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SurgeryError, match="head"):
        edit(model, x)  # type: ignore[operator]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert neuroexapt.get_history(model) == []


def test_prune_to_removes_whole_heads() -> None:
    model, x = _model(rotary=True)
    with torch.no_grad():
        for lin in (model.attn.q, model.attn.k, model.attn.v):
            lin.weight[HEAD : 2 * HEAD] *= 1e-3
    data = [(x, torch.tensor([0, 1]))] * 2
    neuroexapt.prune_to(model, data, 0.1, score="norm", round_to=None)
    assert model.attn.q.out_features % HEAD == 0 and model.attn.q.out_features < 32
    assert model.attn.k.out_features == model.attn.q.out_features
    assert model(x).shape == (2, 3)


@pytest.mark.parametrize(("kw", "reason"), [
    ({"fixed_heads": True}, "write -1"),
    ({"sdpa": True, "mask": "per_head"}, "differs per head"),
    ({"sdpa": True, "kv_heads": 2}, "grouped-query"),
])
def test_attention_that_cannot_follow_a_change_of_heads_is_frozen(kw: dict[str, object],
                                                                  reason: str) -> None:
    model, x = _model(**kw)
    group = neuroexapt.trace(model, x).group_of("attn.q")
    assert not group.resizable
    assert any(reason in why for why in group.frozen), group.frozen
    with pytest.raises(SurgeryError):
        neuroexapt.widen(model, "attn.q", HEAD, example_inputs=x)


class PerHeadLinear(nn.Module):
    """A Linear applied to each head's positions: it reads the heads as plain units."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.mix = nn.Linear(6, 32), nn.Linear(HEAD, HEAD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h = self.q(x).view(b, s, -1, HEAD)
        return self.mix(h).flatten(2).sum(-1)


def test_a_layer_reading_heads_freezes_them() -> None:
    torch.manual_seed(0)
    model, x = PerHeadLinear().eval(), torch.randn(2, 5, 6)
    group = neuroexapt.trace(model, x).group_of("q")
    assert not group.resizable
    assert any("attention heads reach 'mix'" in why for why in group.frozen), group.frozen
