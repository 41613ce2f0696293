"""What a model costs to run: multiply-accumulates of one forward pass.

Counted with :class:`torch.utils.flop_counter.FlopCounterMode`, which sees every matrix
product and convolution of the forward (whatever module or function issues it) and counts two
FLOPs per multiply-accumulate; element-wise operations, normalisation and pooling are not
counted (they are a few percent of a CNN's work and the convention of the field leaves them
out, as Torch-Pruning's ``count_ops_and_params`` does).

Example:
    >>> count_macs(model, torch.randn(1, 3, 32, 32))   # MACs of one image
    40960000
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from neuroexapt.errors import ConfigError

__all__ = ["count_macs"]


@torch.no_grad()
def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of ``model(*example_inputs)`` in eval mode (the whole batch).

    Args:
        model: any module; its training mode is restored afterwards.
        example_inputs: a tensor or a tuple of tensors the model accepts.

    Raises:
        ConfigError: ``example_inputs`` is neither a tensor nor a tuple/list of them.
    """
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(inputs, tuple | list) or not all(
            isinstance(t, torch.Tensor) for t in inputs):
        raise ConfigError("count_macs needs a tensor or a tuple of tensors as example_inputs, "
                          f"got {type(example_inputs).__name__}")
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(*inputs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // 2
