"""PyTorch's own transformer layers, traced through their plain path.

``nn.TransformerEncoderLayer`` and its relatives choose between a fused fast path and the
plain one with checks on their inputs (``src.dim() == 3``, ``requires_grad``) that symbolic
tracing cannot evaluate. Both paths compute the same function with the same parameters, so
the tracer follows the plain one, written here exactly as PyTorch writes it: the graph then
shows their LayerNorms, ``nn.MultiheadAttention`` and feed-forward Linears, and the model
dimension and the feed-forward width become resizable. At run time the layers still choose
their path as usual.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["plain_forward"]


def _encoder_layer(m: nn.TransformerEncoderLayer, src: Any, src_mask: Any = None,
                   src_key_padding_mask: Any = None, is_causal: bool = False) -> Any:
    x = src
    if m.norm_first:
        x = x + m._sa_block(m.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
        return x + m._ff_block(m.norm2(x))
    x = m.norm1(x + m._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
    return m.norm2(x + m._ff_block(x))


def _decoder_layer(m: nn.TransformerDecoderLayer, tgt: Any, memory: Any, tgt_mask: Any = None,
                   memory_mask: Any = None, tgt_key_padding_mask: Any = None,
                   memory_key_padding_mask: Any = None, tgt_is_causal: bool = False,
                   memory_is_causal: bool = False) -> Any:
    x = tgt
    if m.norm_first:
        x = x + m._sa_block(m.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
        x = x + m._mha_block(m.norm2(x), memory, memory_mask, memory_key_padding_mask,
                             memory_is_causal)
        return x + m._ff_block(m.norm3(x))
    x = m.norm1(x + m._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
    x = m.norm2(x + m._mha_block(x, memory, memory_mask, memory_key_padding_mask,
                                 memory_is_causal))
    return m.norm3(x + m._ff_block(x))


def _encoder(m: nn.TransformerEncoder, src: Any, mask: Any = None,
             src_key_padding_mask: Any = None, is_causal: bool | None = None) -> Any:
    output = src
    for layer in m.layers:
        output = layer(output, src_mask=mask, is_causal=bool(is_causal),
                       src_key_padding_mask=src_key_padding_mask)
    return m.norm(output) if m.norm is not None else output


def _decoder(m: nn.TransformerDecoder, tgt: Any, memory: Any, tgt_mask: Any = None,
             memory_mask: Any = None, tgt_key_padding_mask: Any = None,
             memory_key_padding_mask: Any = None, tgt_is_causal: bool | None = None,
             memory_is_causal: bool = False) -> Any:
    output = tgt
    for layer in m.layers:
        output = layer(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                       tgt_key_padding_mask=tgt_key_padding_mask,
                       memory_key_padding_mask=memory_key_padding_mask,
                       tgt_is_causal=bool(tgt_is_causal), memory_is_causal=memory_is_causal)
    return m.norm(output) if m.norm is not None else output


def _transformer(m: nn.Transformer, src: Any, tgt: Any, src_mask: Any = None,
                 tgt_mask: Any = None, memory_mask: Any = None, src_key_padding_mask: Any = None,
                 tgt_key_padding_mask: Any = None, memory_key_padding_mask: Any = None,
                 src_is_causal: bool | None = None, tgt_is_causal: bool | None = None,
                 memory_is_causal: bool = False) -> Any:
    memory = m.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask,
                       is_causal=src_is_causal)
    return m.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                     tgt_key_padding_mask=tgt_key_padding_mask,
                     memory_key_padding_mask=memory_key_padding_mask,
                     tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)


_PLAIN: dict[type[nn.Module], Callable[..., Any]] = {
    nn.TransformerEncoderLayer: _encoder_layer,
    nn.TransformerDecoderLayer: _decoder_layer,
    nn.TransformerEncoder: _encoder,
    nn.TransformerDecoder: _decoder,
    nn.Transformer: _transformer,
}


def plain_forward(module: nn.Module) -> Callable[..., Any] | None:
    """The traceable plain path of PyTorch's transformer ``module`` (``None`` for others).

    Only for the classes themselves, or subclasses that keep their ``forward``.
    """
    for cls, fn in _PLAIN.items():
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return _bound(module, fn, inspect.signature(cls.forward))
    return None


def _bound(module: nn.Module, fn: Callable[..., Any], signature: inspect.Signature
           ) -> Callable[..., Any]:
    """``fn(module, ...)`` taking the arguments as the module's ``forward`` takes them."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(module, *args, **kwargs)
        return fn(*bound.args, **bound.kwargs)

    return forward
