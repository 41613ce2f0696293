"""What a model costs to run: multiply-accumulates of one forward pass, and its measured
latency per module on the machine it runs on.

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

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from neuroexapt.errors import ConfigError

__all__ = ["count_macs", "measure_latency"]


def _as_inputs(example_inputs: Any, what: str) -> tuple[torch.Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(inputs, tuple | list) or not all(
            isinstance(t, torch.Tensor) for t in inputs):
        raise ConfigError(f"{what} needs a tensor or a tuple of tensors as example_inputs, "
                          f"got {type(example_inputs).__name__}")
    return tuple(inputs)


@torch.no_grad()
def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of ``model(*example_inputs)`` in eval mode (the whole batch).

    Args:
        model: any module; its training mode is restored afterwards.
        example_inputs: a tensor or a tuple of tensors the model accepts.

    Raises:
        ConfigError: ``example_inputs`` is neither a tensor nor a tuple/list of them.
    """
    inputs = _as_inputs(example_inputs, "count_macs")
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(*inputs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // 2


@torch.no_grad()
def measure_latency(model: nn.Module, example_inputs: Any, *, repeats: int = 5,
                    warmup: int = 2, modules: Sequence[str] | None = None
                    ) -> tuple[float, dict[str, float]]:
    """Median wall seconds of ``model(*example_inputs)`` in eval mode, and of each module.

    The whole forward is timed without hooks; each of ``modules`` (default: every module
    without children) is then timed inside the forward by a pre- and a post-hook
    (``time.perf_counter``), so the module
    times include the hooks' own few microseconds and need not add up to the total. Both are
    medians over ``repeats`` forwards after ``warmup`` untimed ones, with the current
    ``torch.get_num_threads()``. On a GPU the device is synchronised around every timing.

    Returns:
        ``(total seconds, {module name: seconds})``; a module that runs several times per
        forward has the sum of its runs.

    Raises:
        ConfigError: bad ``example_inputs``, ``repeats`` or ``warmup``.
    """
    inputs = _as_inputs(example_inputs, "measure_latency")
    for name, value, low in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
    cuda = any(t.is_cuda for t in inputs)

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    was_training = model.training
    model.eval()
    if modules is None:
        leaves = [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]
    else:
        leaves = [(n, model.get_submodule(n)) for n in modules]
    spent: dict[str, list[float]] = {n: [] for n, _ in leaves}
    started: dict[str, float] = {}
    try:
        for _ in range(warmup):
            model(*inputs)
        totals = []
        for _ in range(repeats):
            t0 = now()
            model(*inputs)
            totals.append(now() - t0)
        handles = []
        for name, module in leaves:
            handles.append(module.register_forward_pre_hook(
                lambda m, a, n=name: started.__setitem__(n, now())))
            handles.append(module.register_forward_hook(
                lambda m, a, o, n=name: spent[n].append(now() - started[n])))
        try:
            for _ in range(repeats):
                runs = {n: len(v) for n, v in spent.items()}
                model(*inputs)
                for n, v in spent.items():  # several calls in one forward: one summed entry
                    if len(v) > runs[n] + 1:
                        v[runs[n]:] = [sum(v[runs[n]:])]
        finally:
            for h in handles:
                h.remove()
    finally:
        model.train(was_training)
    return statistics.median(totals), {n: statistics.median(v) for n, v in spent.items() if v}
