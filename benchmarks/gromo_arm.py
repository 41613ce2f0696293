"""GroMo (``gromo`` 0.1.0, github.com/growingnet/gromo) as one arm of the CIFAR-10 growth benchmark.

:func:`run_gromo_arm` trains GroMo's own growing CNN with the recipe of the other arms of
``benchmarks/cifar10_growth.py`` and grows it with GroMo's own procedure.

**Model.** GroMo 0.1.0 has a growing VGG container, ``gromo.containers.vgg.VGG`` (a
``SequentialGrowingModel`` of ``RestrictedConv2dGrowingModule`` convolutions, each followed
by ``GrowingBatchNorm2d`` and ReLU, then ``LinearGrowingModule`` classifier layers).
:func:`gromo_vgg` builds it as close as it allows to ``benchmarks.common.vgg_cnn(width)``:
``cfg = [w, w, "M", 2w, 2w, "M", 4w, 4w, "M"]``, one fully connected layer (so no hidden
classifier layer and no dropout), and ``input_spatial_shape=(8, 8)``, which makes the
container's ``AdaptiveAvgPool2d(final_spatial_shape)`` a global average pool (8 / 2**3 = 1),
so the classifier is ``Linear(4w, 10)`` as in ``vgg_cnn``. Differences that GroMo's VGG
does not let us remove:

* its convolutions have a bias (``use_bias=True`` is fixed in ``_VGGStageBlock``): 224 more
  parameters than ``vgg_cnn(16)`` (73,178 against 72,954);
* its initialisation (``VGG._initialize_weights``: Kaiming-normal convolutions, classifier
  N(0, 0.01)), not PyTorch's default;
* **only the first convolution of each stage can grow** (GroMo grows a layer's *input*,
  i.e. the previous convolution's output channels, and a VGG stage starts after a pool, so
  the first convolution of a stage has no growing predecessor). Of the six widths
  ``w, w, 2w, 2w, 4w, 4w``, GroMo grows the 1st, 3rd and 5th; the stage outputs stay at
  ``w, 2w, 4w``. ``target_cfg`` (4x the initial widths of the growable layers) only marks
  these layers as growable; growth is bounded by ``param_budget``, not by the target.

**Growth** (after training and validating each epoch listed in ``growth_epochs``), as in
GroMo's ``examples/plot_growing_container_tutorial.py`` (it grows a ``GrowingMLP``; GroMo
ships no CNN training example), except that the layer is chosen by GroMo's
``GrowingContainer.select_best_update`` instead of round robin, and the statistics use a
few batches instead of the whole training set:

1. ``model.set_growing_layers(scheduling_method="all")``: the three growable layers;
2. ``gromo.utils.training_utils.compute_statistics`` (``init_computation``, then per batch
   forward, backward of ``CrossEntropyLoss(reduction="sum")``, ``update_computation``) on
   ``stat_batches`` batches of un-augmented training images, drawn with a generator of
   their own so that the training data stream stays that of the other arms (at width 16
   this costs about 2 s per batch of 128 on one CPU thread, mostly GroMo's S statistics);
3. ``model.compute_optimal_updates(maximum_added_neurons=neurons_per_growth)``: TINY
   (Verbockhaven et al., TMLR 2024) with GroMo's defaults: the optimal update of the
   existing weights (``compute_delta=True``) and, from the SVD of S^-1/2 N, at most
   ``neurons_per_growth`` new neurons whose singular value is >= ``statistical_threshold``
   (GroMo's default 1e-3; fewer neurons are added when fewer pass it), then
   ``reset_computation()``;
4. ``model.select_best_update()``: the layer of largest ``first_order_improvement``; the
   other layers' proposals are deleted;
5. if ``param_budget`` would be exceeded, the proposal is cut to the neurons that fit
   (``sub_select_optimal_added_parameters``); when not one fits, growth stops for the run;
6. line search of the tutorial: the scaling factor among ``scales`` (default 0, 0.1, 0.5, 1)
   with the lowest mean loss of ``evaluate_model(..., use_extended_model=True)`` on the
   statistics batches; ``model.set_scaling_factor(best)``; ``model.apply_change()``.
   When 0 wins, the proposal is dropped and nothing is added: applied with factor 0, the
   new neurons would have zero incoming and outgoing weights and never train.

After a change the optimizer is rebuilt over the new parameters: GroMo replaces the
grown layers' ``nn.Conv2d`` (new ``Parameter`` objects) and has no optimizer support, so
the momentum buffers of **all** parameters are lost. The cosine schedule keeps its
position (its state is carried over). The new BatchNorm channels start at weight 1, bias 0,
running mean 0, variance 1: in eval mode the change is the one that the line search
evaluated, in training mode they are normalised by batch statistics, so the function
changes at the first training batch after growth.

Measured as in ``cifar10_growth.run_epoch``: training MACs = sum over epochs of
``neuroexapt.metrics.count_macs`` (forward MACs of one image through the model as it is
during that epoch) x training images; wall time = training + validation + growth seconds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from gromo.containers.vgg import VGG
from gromo.modules.growing_module import GrowingModule
from gromo.utils.tensor_statistic import TensorStatistic
from gromo.utils.training_utils import compute_statistics, evaluate_model
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from neuroexapt.metrics import count_macs

try:
    from benchmarks.common import augment, conv_widths, cosine_schedule, evaluate, params
except ImportError:  # run as a script: benchmarks/ itself is sys.path[0]
    from common import (  # type: ignore[no-redef]
        augment,
        conv_widths,
        cosine_schedule,
        evaluate,
        params,
    )

__all__ = ["gromo_vgg", "grow", "run_gromo_arm"]

SCALES = (0.0, 0.1, 0.5, 1.0)  # the line search of GroMo's container tutorial


def gromo_vgg(width: int, classes: int = 10, target_factor: int = 4) -> VGG:
    """GroMo's growing VGG shaped like ``vgg_cnn(width)`` (see the module docstring)."""
    w = width
    cfg: list[str | int] = [w, w, "M", 2 * w, 2 * w, "M", 4 * w, 4 * w, "M"]
    # target widths > initial widths mark the first conv of each stage as growable
    target: list[str | int] = [target_factor * v if isinstance(v, int) and i % 3 == 0 else v
                               for i, v in enumerate(cfg)]
    return VGG(cfg, target_cfg=target, in_features=3, num_classes=classes,
               normalization="batch", number_of_fc_layers=1, dropout=0.0,
               input_spatial_shape=(8, 8), device="cpu")


def _neuron_cost(layer: GrowingModule) -> int:
    """Parameters one new neuron adds when ``layer``'s input (its predecessor's output) grows:
    the predecessor's kernel and bias, its BatchNorm affine pair, ``layer``'s kernel slice."""
    prev = layer.previous_module
    assert isinstance(prev, GrowingModule)
    per_channel_post = sum(p.numel() for p in prev.post_layer_function.parameters())
    return (prev.layer.weight[0].numel() + int(prev.use_bias)
            + per_channel_post // prev.out_features + layer.layer.weight[:, 0].numel())


def _grown_name(model: nn.Module, layer: GrowingModule) -> str:
    """Module path of the convolution whose output channels grow (``layer``'s predecessor)."""
    target = layer.previous_module if isinstance(layer.previous_module, GrowingModule) else layer
    return next(name for name, module in model.named_modules() if module is target)


def grow(model: VGG, loader: DataLoader, *, neurons: int, budget: int | None,
         scales: Sequence[float] = SCALES, statistical_threshold: float = 1e-3,
         compute_delta: bool = True) -> dict[str, Any]:
    """One GroMo growth step of ``model`` (steps 1-6 of the module docstring); its record.

    ``kind`` of the record: ``grow`` (neurons added), ``rejected`` (the line search chose
    0), ``budget`` (not one neuron fits the budget: growth stops).
    """
    before = params(model)
    model.set_growing_layers(scheduling_method="all")
    layers = list(model._growing_layers)
    costs = [_neuron_cost(layer) for layer in layers]  # type: ignore[arg-type]
    record: dict[str, Any] = {"params_before": before, "params_after": before,
                              "layer": None, "neurons": 0, "scale": None}
    if budget is not None and before + min(costs) > budget:
        return {**record, "kind": "budget"}
    compute_statistics(model, loader, loss_function=nn.CrossEntropyLoss(reduction="sum"))
    model.compute_optimal_updates(maximum_added_neurons=neurons,
                                  statistical_threshold=statistical_threshold,
                                  compute_delta=compute_delta)
    model.reset_computation()
    record["improvements"] = {_grown_name(model, layer): float(layer.first_order_improvement)
                              for layer in layers}  # type: ignore[arg-type]
    index = model.select_best_update()
    layer = layers[index]
    assert isinstance(layer, GrowingModule) and layer.eigenvalues_extension is not None
    record["layer"] = _grown_name(model, layer)
    proposed = int(layer.eigenvalues_extension.shape[0])
    record["proposed"] = proposed
    if budget is not None and before + proposed * costs[index] > budget:
        fit = (budget - before) // costs[index]
        if fit < 1:
            layer.delete_update()
            model.currently_updated_layer_index = None
            return {**record, "kind": "budget"}
        layer.sub_select_optimal_added_parameters(keep_neurons=fit)
    losses = {}
    for scale in scales:
        model.set_scaling_factor(scale)
        losses[scale], _ = evaluate_model(model, loader, nn.CrossEntropyLoss(),
                                          use_extended_model=True)
    best = min(losses, key=losses.__getitem__)
    record["line_search"] = {str(s): loss for s, loss in losses.items()}
    record["scale"] = best
    if best == 0.0:
        layer.delete_update()
        model.currently_updated_layer_index = None
        model.set_growing_layers(scheduling_method="all")
        return {**record, "kind": "rejected"}
    added = int(layer.eigenvalues_extension.shape[0])
    model.set_scaling_factor(best)
    model.apply_change()
    _unfix_statistic_shapes(model)
    model.set_growing_layers(scheduling_method="all")
    return {**record, "kind": "grow", "neurons": added, "params_after": params(model)}


def _unfix_statistic_shapes(model: nn.Module) -> None:
    """Let every GroMo statistic take the grown widths.

    GroMo 0.1.0 fixes each ``TensorStatistic``'s shape when the layer is built and does not
    update it when a neighbouring layer grows, so the second growth step of a VGG fails with
    "The update tensor has a different size than the tensor statistic". A shape of None is
    GroMo's own "any shape"; the statistics are empty after ``reset_computation`` anyway.
    """
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, TensorStatistic):
                value._shape = None


def _stats_loader(x: torch.Tensor, y: torch.Tensor, batches: int, batch: int,
                  gen: torch.Generator) -> DataLoader:
    """``batches`` batches of un-augmented training images drawn without replacement."""
    idx = torch.randperm(len(y), generator=gen)[:batches * batch]
    return DataLoader(TensorDataset(x[idx], y[idx]), batch_size=batch, shuffle=False)


def _rebuild_optimizer(model: nn.Module, old: torch.optim.Optimizer,
                       old_sched: torch.optim.lr_scheduler.LRScheduler, steps: int, lr: float,
                       weight_decay: float
                       ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """A fresh SGD over the grown model's parameters at the old schedule position.

    GroMo does not migrate optimizer state: the grown layers hold new Parameter objects, so
    the momentum of every parameter restarts from zero.
    """
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                          weight_decay=weight_decay)
    sched = cosine_schedule(opt, steps)
    sched.load_state_dict(old_sched.state_dict())
    for group, old_group in zip(opt.param_groups, old.param_groups, strict=True):
        group["lr"] = old_group["lr"]
    return opt, sched


def _train_epoch(model: nn.Module, opt: torch.optim.Optimizer,
                 sched: torch.optim.lr_scheduler.LRScheduler, x: torch.Tensor,
                 y: torch.Tensor, batch: int, gen: torch.Generator) -> tuple[float, float]:
    """``cifar10_growth.train_epoch``: one augmented pass; (mean loss, accuracy in %)."""
    model.train()
    loss_sum, hits = 0.0, 0
    for idx in torch.randperm(len(y), generator=gen).split(batch):
        inputs, targets = augment(x[idx], gen), y[idx]
        out = model(inputs)
        loss = F.cross_entropy(out, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_sum += loss.item() * len(idx)
        hits += int((out.argmax(1) == targets).sum())
    return loss_sum / len(y), 100.0 * hits / len(y)


def run_gromo_arm(data: dict[str, torch.Tensor], *, width: int, epochs: int, batch_size: int,
                  lr: float, weight_decay: float, seed: int, growth_epochs: list[int],
                  neurons_per_growth: int, param_budget: int | None,
                  log: Callable[[str], None], stat_batches: int = 4,
                  scales: Sequence[float] = SCALES, statistical_threshold: float = 1e-3,
                  compute_delta: bool = True) -> dict[str, Any]:
    """Train and grow GroMo's VGG on ``data`` with the benchmark's recipe; its measurements.

    ``data`` holds ``x_train, y_train, x_val, y_val, x_test, y_test``. The model is built
    after ``torch.manual_seed(seed)``; one generator seeded with ``seed`` gives the order and
    augmentation of every epoch (the stream of the other arms). Growth happens after
    training and validation of each epoch in ``growth_epochs`` (1-based). The keyword
    options after ``log`` are GroMo's knobs (module docstring).
    """
    torch.manual_seed(seed)
    model = gromo_vgg(width)
    x, y = data["x_train"], data["y_train"]
    steps = epochs * math.ceil(len(y) / batch_size)
    opt: torch.optim.Optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    sched = cosine_schedule(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    history: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    train_macs, stopped = 0, False
    for epoch in range(1, epochs + 1):
        macs = count_macs(model, data["x_val"][:1])
        n_params = params(model)
        epoch_lr = opt.param_groups[0]["lr"]
        t0 = time.perf_counter()
        train_loss, train_acc = _train_epoch(model, opt, sched, x, y, batch_size, gen)
        t1 = time.perf_counter()
        val_loss, val_acc = evaluate(model, data["x_val"], data["y_val"])
        t2 = time.perf_counter()
        epoch_events: list[dict[str, Any]] = []
        if epoch in growth_epochs and not stopped:
            loader = _stats_loader(x, y, stat_batches, batch_size,
                                   torch.Generator().manual_seed(seed * 1_000 + epoch))
            event = grow(model, loader, neurons=neurons_per_growth, budget=param_budget,
                         scales=scales, statistical_threshold=statistical_threshold,
                         compute_delta=compute_delta)
            event["epoch"] = epoch
            event["seconds"] = time.perf_counter() - t2
            stopped = event["kind"] == "budget"
            if event["kind"] == "grow":
                opt, sched = _rebuild_optimizer(model, opt, sched, steps, lr, weight_decay)
            epoch_events.append(event)
        t3 = time.perf_counter()
        train_macs += macs * len(y)
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        history.append({
            "epoch": epoch, "lr": epoch_lr, "train_loss": train_loss, "train_acc": train_acc,
            "val_loss": val_loss, "val_acc": val_acc, "params": n_params,
            "params_after": params(model), "forward_macs": macs, "train_s": t1 - t0,
            "val_s": t2 - t1, "growth_s": t3 - t2, "wall_s": t3 - t0,
            "events": [f"{e['kind']} {e['neurons']} at {e['layer']}" for e in epoch_events],
            "all_params_in_optimizer": all(id(p) in in_opt for p in model.parameters()),
        })
        events += epoch_events
        h = history[-1]
        log(f"seed {seed} epoch {epoch:>2}/{epochs} gromo train {train_acc:5.1f}% "
            f"val {val_acc:5.1f}% params {h['params_after']:>9,} {h['wall_s']:6.1f} s"
            + (f"  {', '.join(h['events'])}" if h["events"] else ""))
    test_loss, test_acc = evaluate(model, data["x_test"], data["y_test"])
    return {
        "seed": seed, "test_acc": test_acc, "test_loss": test_loss, "params": params(model),
        "widths": conv_widths(model), "train_macs": train_macs,
        "final_forward_macs": count_macs(model, data["x_val"][:1]),
        "wall_s": sum(h["wall_s"] for h in history),
        "train_s": sum(h["train_s"] for h in history),
        "val_s": sum(h["val_s"] for h in history),
        "growth_s": sum(h["growth_s"] for h in history),
        "history": history, "events": events,
    }
