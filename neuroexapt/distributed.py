"""Architecture changes under ``torch.distributed`` (DDP launched by ``torchrun``).

Every rank measures (the statistics are all-reduced, so every rank sees the union of the
batches) and runs the same decision code, so collectives stay matched; rank 0's outcome is
the one kept:

* decisions that depend on per-rank values (whether to change now, whether to roll back)
  are :func:`broadcast` from rank 0;
* after an architecture change, :func:`synchronize` sends rank 0's new edit records to every
  rank; a rank whose own edits differ (a tie broken differently) restores its snapshot and
  replays rank 0's; then every parameter, buffer and optimizer state tensor is broadcast
  from rank 0, and the shapes are checked equal on every rank;
* :func:`rewrap` builds a new ``DistributedDataParallel`` around the edited module (DDP's
  gradient buckets only know the parameters it was built with, pytorch/pytorch#12603), with
  the old wrapper's options; the old wrapper refuses to run from then on, with the fix, so a
  loop that kept it cannot train a model whose new parameters are never synchronised.

Without an initialised process group every function is a no-op (one process).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from neuroexapt.errors import ConfigError, SurgeryError

logger = logging.getLogger(__name__)

__all__ = ["architecture_digest", "average_gradients", "broadcast", "broadcast_tensors",
           "is_distributed", "rank", "rewrap", "split_ddp", "synchronize"]

DDP = nn.parallel.DistributedDataParallel


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if not is_distributed():
        return value
    box = [value if rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_tensors(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite every tensor, in place, with rank 0's (a no-op in one process)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=0)


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Average the gradients of ``params`` (parameters outside a DDP wrapper) over the ranks.

    A parameter without a gradient on this rank counts as zero, so that every rank joins
    every collective whatever its own batch reached.
    """
    if not is_distributed():
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world


def split_ddp(model: nn.Module) -> tuple[nn.Module, Any]:
    """``(module, wrapper)`` of a DistributedDataParallel model, ``(model, None)`` otherwise.

    Raises:
        ConfigError: a DDP model without an initialised process group.
    """
    if not isinstance(model, DDP):
        return model, None
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("the model is wrapped in DistributedDataParallel but no process group "
                          "is initialised: call torch.distributed.init_process_group(...) "
                          "first (torchrun sets the environment for it)")
    return model.module, model


def architecture_digest(model: nn.Module) -> str:
    """A hash of every parameter's and buffer's name and shape."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)};".encode())
    return h.hexdigest()[:16]


def _spec(records: list[Any]) -> list[tuple[str, str, str]]:
    return [(r.op, r.target, repr(sorted(r.args.items()))) for r in records]


def synchronize(model: nn.Module, optimizer: torch.optim.Optimizer | None, since: int,
                snapshot: Any = None) -> None:
    """Make every rank hold rank 0's architecture, parameters, buffers and optimizer state
    after the edits recorded in ``model``'s history from position ``since``.

    ``snapshot`` (a :class:`~neuroexapt.policy.rollback.Snapshot` taken before the edits) lets
    a rank whose edits differ from rank 0's start again from it and replay rank 0's.

    Raises:
        SurgeryError: the ranks still disagree on the architecture (nothing can fix that).
    """
    if not is_distributed():
        return
    from neuroexapt.ops.checkpoint import replay
    from neuroexapt.ops.history import get_history

    mine = get_history(model)[since:]
    theirs = broadcast(mine)
    if _spec(mine) != _spec(theirs):
        if snapshot is None:
            raise SurgeryError(f"rank {rank()} made other edits than rank 0 and has no "
                               "snapshot to start again from")
        logger.info("rank %d: edits differ from rank 0's; replaying rank 0's", rank())
        snapshot.restore(model, optimizer)
        replay(model, list(theirs), optimizer=optimizer)
    broadcast_tensors(list(model.parameters()) + list(model.buffers()))
    if optimizer is not None:
        broadcast_tensors(value for group in optimizer.param_groups for p in group["params"]
                          for value in optimizer.state.get(p, {}).values()
                          if isinstance(value, torch.Tensor))
    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, architecture_digest(model))
    if len(set(digests)) != 1:
        raise SurgeryError(f"the ranks hold different architectures after an edit ({digests})")


_DDP_OPTIONS = ("device_ids", "output_device", "dim", "find_unused_parameters",
                "gradient_as_bucket_view", "static_graph")


def rewrap(old: Any, module: nn.Module) -> Any:
    """A new ``DistributedDataParallel`` around ``module`` with ``old``'s options; ``old``
    refuses to run from then on."""
    options = {}
    for key in _DDP_OPTIONS:
        if hasattr(old, key):
            options[key] = getattr(old, key)
    if options.get("device_ids") is not None:
        options["device_ids"] = [d.index if isinstance(d, torch.device) else d
                                 for d in options["device_ids"]]
    if isinstance(options.get("output_device"), torch.device):
        options["output_device"] = options["output_device"].index
    options = {k: v for k, v in options.items() if v is not None}
    if getattr(old, "broadcast_buffers", True) is False:  # passed only when not the default
        key = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
            DDP.__init__).parameters else "broadcast_buffers"
        options[key] = False
    new = DDP(module, process_group=getattr(old, "process_group", None), **options)

    def stale(*_: Any) -> None:
        raise ConfigError("this DistributedDataParallel wrapper predates an architecture "
                          "change and no longer synchronises the model's gradients: use the "
                          "new one (dnm.model, or the 'model' the change returned)")

    old.register_forward_pre_hook(stale)
    return new
