"""``neuroexapt.Trainer``: training with the information bottleneck and structural evolution.

Each epoch trains with ``loss + info_weight * mean_units 0.5 log(1 + mu^2 / sigma^2)`` (the
variational information-bottleneck gates of :class:`InformationBottleneck` on every hidden
Conv/Linear layer, after its BatchNorm when one alone reads it; the mean over all gated units
keeps ``info_weight`` meaningful whatever the model's size), re-measures the BatchNorm
statistics with noise-free gates (the gates' training noise would otherwise stay in them),
validates, keeps the best checkpoint and, every ``evolve_every`` epochs, evolves the structure:

* **adaptive entropy threshold**: ``threshold_t = entropy_threshold * min(1, t / ramp) *
  feedback``; the ramp (half of the epochs) lets gates learn before anything is removed; the
  feedback halves after a rolled-back change and recovers by 25% after each kept one;
* **task complexity**: a layer never loses units below a total gate capacity of H(Y), the
  label entropy measured on the validation targets (classification);
* **layer importance** (with ``NeuroExapt.set_importance_metric``): each layer's threshold is
  multiplied by ``2 (1 - q)``, ``q`` the quantile of the layer's importance among the gated
  layers (its average rank over ``layers - 1``: ties share one, equal importances change
  nothing), so the least important layer is pruned at twice the threshold, the most important
  not at all, and the mean pressure is unchanged; per-unit scores choose which
  of a layer's candidates go first;
* **pruning**: a residual block all of whose gates pass less than ``threshold_t`` nats is
  replaced by its shortcut (``remove_block``); elsewhere the units whose gate passes less than
  ``threshold_t`` are removed for real (``narrow``), at most ``max_prune_fraction`` of a layer
  at a time and never its last unit;
* **expansion** (``expand=True``): where the analysis finds information lost, the facade's
  ``expand_layers`` grows the network (function-preserving);
* **rollback**: if the validation metric then drops by more than ``rollback_threshold``, the
  model and its optimizer are restored exactly.

The gates' ``mu`` are folded into the layers before every change and at the end of ``fit``, so
the model returned computes what the gated model computes in eval mode.

Measurements: the model's facade (:class:`NeuroExapt`, the one that wrapped it) measures the
model on the first validation batches after every epoch while a monitor or a custom importance
metric is set; at the end of ``fit`` it keeps those batches (``ne.measure_later``), so
``ne.report``, ``ne.prune_layers()``, ``ne.expand_layers()`` and ``ne.measure()`` measure the
trained model on them when first called, without data; edits made through
the facade migrate the Trainer's optimizer, so a second ``fit`` trains what they added.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neuroexapt.distributed import (
    average_gradients,
    broadcast,
    broadcast_tensors,
    is_distributed,
    rank,
    rewrap,
    split_ddp,
    synchronize,
)
from neuroexapt.errors import AnalysisError, CheckpointError, ConfigError, NeuroExaptError
from neuroexapt.graph import trace
from neuroexapt.graph.wrappers import refuse_fullgraph
from neuroexapt.metrics.estimators import label_entropy
from neuroexapt.ops import narrow, remove_block, save
from neuroexapt.ops.edit import count_parameters
from neuroexapt.ops.history import get_history
from neuroexapt.policy.rollback import Snapshot
from neuroexapt.train.bottleneck import InformationBottleneck
from neuroexapt.train.facade import NeuroExapt, facade_of
from neuroexapt.train.resume import RESUME_FILE, RunState, read_run, write_run

logger = logging.getLogger(__name__)

__all__ = ["Trainer"]

Batch = tuple[Any, torch.Tensor]


class Trainer:
    """Trains a model while the information bottleneck prunes (and optionally grows) it.

    Args:
        model: the model (wrapped by ``NeuroExapt.wrap_model`` or not).
        info_weight: weight of the information-bottleneck regulariser.
        entropy_threshold: nats; units passing less information than the (adapted) threshold
            are pruned.
        optimizer: optimizer of the model's parameters (default Adam with ``lr``); its state
            follows every change.
        lr: learning rate of the default optimizers (model and gates).
        scheduler: ``fn(optimizer) -> LRScheduler`` stepped once per epoch.
        device: where to train (default: the model's device).
        loss_fn: default cross-entropy (classification) or MSE (regression).
        evolve_every: epochs between structural changes.
        expand: also grow where information is lost.
        max_prune_fraction: largest share of a layer's units removed in one change.
        rollback_threshold: validation drop that rolls a change back.
        checkpoint_dir: where ``best.pt`` (neuroexapt.save format) is written, and after
            every epoch ``resume.pt``, the run's state that ``fit(..., resume=True)`` continues
            from (:mod:`neuroexapt.train.resume`).
        recalibrate_batches: training batches over which BatchNorm statistics are measured
            again with noise-free gates after every epoch (0: never).
        progress: show a tqdm progress bar when tqdm is installed.
        search_epochs: epochs of architecture search before ``epochs`` of training, for a
            model with relaxed choices (``ne.relax(...)``): the choices are searched
            (:func:`neuroexapt.relax.search` on the training batches, the Trainer's optimizer
            training the weights), the model is discretised, and training goes on with the
            chosen architecture. The search's history is in ``trainer.search_result``.
        search: options of the search (``arch_lr``, ``tau``, ``penalty``, ``cost``,
            ``log_dir``); ``log_dir`` defaults to ``<checkpoint_dir>/search``, where
            ``history.jsonl``, TensorBoard scalars and ``choices.png`` are written.
    """

    def __init__(
        self, model: nn.Module, info_weight: float = 0.1, entropy_threshold: float = 0.3, *,
        optimizer: torch.optim.Optimizer | None = None, lr: float = 1e-3,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        device: str | torch.device | None = None,
        loss_fn: Callable[..., torch.Tensor] | None = None, evolve_every: int = 1,
        expand: bool = False, max_prune_fraction: float = 0.25,
        rollback_threshold: float = 0.05, checkpoint_dir: str | None = None,
        progress: bool = True, recalibrate_batches: int = 4, search_epochs: int = 0,
        search: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}")
        for name, value in (("info_weight", info_weight), ("entropy_threshold",
                                                           entropy_threshold), ("lr", lr)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
        if isinstance(evolve_every, bool) or not isinstance(evolve_every, int) or \
                evolve_every < 1:
            raise ConfigError(f"evolve_every must be a positive int, got {evolve_every!r}")
        if isinstance(recalibrate_batches, bool) or not isinstance(recalibrate_batches, int) \
                or recalibrate_batches < 0:
            raise ConfigError(f"recalibrate_batches must be an int >= 0, got "
                              f"{recalibrate_batches!r}")
        if not 0 < max_prune_fraction <= 1:
            raise ConfigError(f"max_prune_fraction must be in (0, 1], got {max_prune_fraction}")
        refuse_fullgraph(model, "the Trainer")
        model, self._ddp = split_ddp(model)  # under DDP: the module is edited, the wrapper
        # trains and is rebuilt after each change (see neuroexapt.distributed)
        self.search_epochs, self.search_options = _check_search(model, search_epochs, search,
                                                                checkpoint_dir)
        if self.search_epochs and self._ddp is not None:
            raise ConfigError("search_epochs is not supported under DistributedDataParallel "
                              "yet: search on one process, discretize, then train with DDP")
        self.search_result: Any = None
        self.model = model
        self.ne = facade_of(model) or (NeuroExapt().wrap_model(model) and facade_of(model))
        assert self.ne is not None
        self.info_weight, self.entropy_threshold, self.lr = info_weight, entropy_threshold, lr
        self.device = torch.device(device) if device is not None else next(
            iter(model.parameters()), torch.empty(0)).device
        self.optimizer = optimizer or torch.optim.Adam(_weights(model), lr=lr)
        self.ne.optimizer = self.optimizer  # edits through the facade migrate it
        self.scheduler = scheduler(self.optimizer) if scheduler is not None else None
        classification = self.ne.task_type == "classification"
        self.loss_fn = loss_fn or (F.cross_entropy if classification else F.mse_loss)
        self.evolve_every, self.expand = evolve_every, expand
        self.max_prune_fraction, self.rollback_threshold = max_prune_fraction, rollback_threshold
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.progress = progress
        self.recalibrate_batches = recalibrate_batches
        self.feedback = 1.0
        self.ib: InformationBottleneck | None = None
        self._gate_of: dict[str, str] = {}  # measured layer -> the gate that follows it
        self.label_entropy: float | None = None  # H(Y) of the validation targets, nats
        self._gate_opt: torch.optim.Optimizer | None = None
        self.history: dict[str, list[float]] = {
            k: [] for k in ("train_loss", "val_loss", "val_metric", "parameters", "threshold",
                            "pruned_units")}

    # ------------------------------------------------------------------ gates
    def _gate(self, example: Any) -> None:
        """New gates on every hidden Conv/Linear layer (not the output)."""
        graph = trace(self.model, example)
        names = []
        self._gate_of = {}
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Linear | nn.modules.conv._ConvNd) and \
                    len(graph.calls.get(name, [])) == 1:
                try:
                    if graph.group_of(name).resizable:
                        names.append(_norm_after(self.model, graph, name) or name)
                        self._gate_of[name] = names[-1]
                except NeuroExaptError:
                    continue
        if not names:
            raise ConfigError("the model has no hidden Conv/Linear layer the Trainer can gate")
        units = sum(_units(self.model.get_submodule(n)) for n in names)
        # info_weight prices the mean information per gated unit, whatever the model's size
        self.ib = InformationBottleneck(self.model, names, self.info_weight / max(1, units))
        broadcast_tensors(self.ib.parameters())  # the same gates on every rank
        self._gate_opt = torch.optim.Adam(self.ib.parameters(), lr=max(self.lr, 1e-2))

    def _absorb(self) -> None:
        if self.ib is not None:
            self.ib.absorb()
            self.ib = None

    # ------------------------------------------------------------------ loop
    def fit(self, train_loader: Iterable[Batch], val_loader: Iterable[Batch],
            epochs: int, *, resume: bool | str | Path = False) -> dict[str, list[float]]:
        """Train for ``epochs``; returns the per-epoch history.

        ``resume``: ``True`` continues the run whose ``resume.pt`` is in ``checkpoint_dir`` (a
        path names another ``resume.pt``): this Trainer must be built as at the start of that
        run (the same, unedited model and optimizer), ``epochs`` is the run's total, and the
        epochs after the checkpoint's are trained, from its state (see
        :mod:`neuroexapt.train.resume`).
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"epochs must be a positive int, got {epochs!r}")
        self.model.to(self.device)
        val = [(_to(x, self.device), y.to(self.device)) for x, y in val_loader]
        if not val:
            raise AnalysisError("val_loader yielded no batch; pass a loader with data")
        best, start, pending = -math.inf, 1, None
        if resume is not False:
            best, start, pending = self._resume(resume, _head(val[0][0]), epochs)
        elif self.search_epochs:
            self._search(train_loader, _head(val[0][0]))
        if self.ib is None:
            self._gate(_head(val[0][0]))
        self.label_entropy = broadcast(label_entropy(torch.cat([y for _, y in val]).cpu())
                                       if self.ne.task_type == "classification" else None)
        bar = _bar(range(start, epochs + 1), self.progress)
        fresh = False  # the facade's report describes the model as it is
        try:  # an error mid-run (a NaN loss, the user's model) leaves no gate behind
            for epoch in bar:
                train_loss = self._train_epoch(train_loader)
                self._recalibrate(train_loader)
                val_loss, metric = broadcast(self._validate(val))  # rank 0's decides for all
                pending = self._maybe_rollback(pending, metric, val)
                if metric > best and self.checkpoint_dir is not None:
                    best = metric
                    if rank() == 0:
                        self._checkpoint()
                fresh = False
                if self.ne.history or self.ne.importance_metric is not None:
                    self.ne.measure(val)  # monitor values and the importance of this epoch
                    fresh = True
                pruned = 0
                if epoch % self.evolve_every == 0 and epoch < epochs:
                    pending, pruned = self._evolve(epoch, epochs, val, metric)
                    fresh = fresh and pending is None
                self._log(train_loss, val_loss, metric, epoch, epochs, pruned)
                if self.checkpoint_dir is not None and rank() == 0:
                    self._save_run(epoch, best, pending)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(val=f"{metric:.4f}", params=count_parameters(self.model))
        except BaseException:
            self._absorb()
            raise
        self._absorb()
        if not fresh:  # ne.prune_layers() and friends measure the trained model when called
            self.ne.measure_later(val)
        return self.history

    def _search(self, loader: Iterable[Batch], example: Any) -> None:
        """The architecture search phase, then the discretised model (see ``search_epochs``)."""
        from neuroexapt.relax import discretize, plot_choices, search

        options = dict(self.search_options)
        log_dir = options.get("log_dir")
        self.search_result = search(self.model, _OnDevice(loader, self.device),
                                    self.search_epochs, optimizer=self.optimizer,
                                    loss_fn=self.loss_fn, **options)
        if log_dir is not None:
            try:
                plot_choices(self.search_result, Path(log_dir) / "choices.png")
            except ConfigError as e:  # matplotlib missing: the JSON history is written
                logger.info("search plot skipped: %s", e)
        discretize(self.model, optimizer=self.optimizer, example_inputs=example)
        logger.info("search: %d epochs in %.0f s, chosen %s", self.search_epochs,
                    self.search_result.seconds, self.search_result.chosen)

    def _train_epoch(self, loader: Iterable[Batch]) -> float:
        assert self.ib is not None and self._gate_opt is not None
        self.model.train()
        total, batches = 0.0, 0
        for x, y in loader:
            x, y = _to(x, self.device), y.to(self.device)
            self.optimizer.zero_grad()
            self._gate_opt.zero_grad()
            net = self._ddp if self._ddp is not None else self.model
            loss = self.loss_fn(net(*_args(x)), y)
            if not torch.isfinite(loss):
                raise AnalysisError("the training loss is NaN or infinite; lower the learning "
                                    "rate or check the inputs")
            (loss + self.ib.regularizer()).backward()
            average_gradients(self.ib.parameters())  # the gates are hooks, outside DDP
            self.optimizer.step()
            self._gate_opt.step()
            total, batches = total + float(loss.detach()), batches + 1
        if batches == 0:
            raise AnalysisError("train_loader yielded no batch; pass a loader with data")
        if self.scheduler is not None:
            self.scheduler.step()
        return total / batches

    @torch.no_grad()
    def _recalibrate(self, loader: Iterable[Batch]) -> None:
        """Re-estimate BatchNorm statistics with noise-free gates (``recalibrate_batches``).

        In training the gates' noise enters the statistics of every BatchNorm downstream; the
        eval-mode model runs without it, so its statistics are measured again, as a plain
        average over the batches, before validation.
        """
        norms = [m for m in self.model.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if not norms or self.ib is None or self.recalibrate_batches == 0:
            return
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
        self.model.train()
        try:
            with self.ib.deterministic():
                for i, (x, _) in enumerate(loader):
                    if i >= self.recalibrate_batches:
                        break
                    self.model(*_args(_to(x, self.device)))
        finally:
            for m, momentum in zip(norms, momenta, strict=True):
                m.momentum = momentum

    @torch.no_grad()
    def _validate(self, val: list[Batch]) -> tuple[float, float]:
        self.model.eval()
        loss = hits = count = 0.0
        for x, y in val:
            out = self.model(*_args(x))
            loss += float(self.loss_fn(out, y)) * len(y)
            count += len(y)
            if self.ne.task_type == "classification":
                hits += float((out.argmax(1) == y).sum())
        mean = loss / count
        return mean, (hits / count if self.ne.task_type == "classification" else -mean)

    # ------------------------------------------------------------------ structure
    def threshold(self, epoch: int, epochs: int) -> float:
        """The adaptive entropy threshold at ``epoch`` (see the module docstring)."""
        ramp = max(1.0, epochs / 2)
        return self.entropy_threshold * min(1.0, epoch / ramp) * self.feedback

    def _evolve(self, epoch: int, epochs: int, val: list[Batch], metric: float
                ) -> tuple[tuple[Snapshot, float] | None, int]:
        assert self.ib is not None
        limit = self.threshold(epoch, epochs)
        info = self.ib.unit_information()
        blocks = _silent_blocks(info, limit) if limit > 0 else []
        weights, unit_scores = self._importance()
        chosen = {}
        for layer, values in info.items():
            layer_limit = limit * weights.get(layer, 1.0)
            # a threshold of 0 nats selects nothing (no unit passes less than 0 nats)
            units = torch.nonzero(values < layer_limit).flatten().tolist() \
                if layer_limit > 0 else []
            cap = int(self.max_prune_fraction * values.numel())
            if units and cap:
                rank = unit_scores.get(layer, values)  # least important (or informative) first
                order = sorted(units, key=lambda u: float(rank[u]))
                chosen[layer] = self._keep_capacity(
                    values, order[: min(cap, values.numel() - 1)], layer)
        chosen = {k: v for k, v in chosen.items() if v}
        chosen, blocks = broadcast((chosen, blocks))  # rank 0's choice, on every rank
        if not chosen and not blocks and not self.expand:
            return None, 0
        self._absorb()
        snapshot = Snapshot.take(self.model, self.optimizer)
        example = _head(val[0][0])
        since = len(get_history(self.model))
        try:  # all or nothing: any error, ours or the model's, restores the snapshot
            removed = 0
            gone: list[str] = []  # blocks removed; deepest first, so a residual block inside a
            for block in blocks:  # silent container is tried before the container
                if any(block.startswith(b + ".") for b in gone):
                    continue
                try:
                    remove_block(self.model, block, example_inputs=example,
                                 optimizer=self.optimizer)
                    gone.append(block)
                    removed += sum(info[n].numel() for n in info if n.startswith(block + "."))
                    logger.info("epoch %d: removed block '%s' (every gate inside passes < %.3f "
                                "nats)", epoch, block, limit)
                except NeuroExaptError as e:
                    logger.info("epoch %d: block '%s' kept: %s", epoch, block, e)
            for layer, units in chosen.items():
                if any(layer.startswith(b + ".") for b in gone):
                    continue
                try:
                    narrow(self.model, layer, remove=units, example_inputs=example,
                           optimizer=self.optimizer)
                    removed += len(units)
                    logger.info("epoch %d: pruned %d units of '%s' (gate information < %.3f "
                                "nats)", epoch, len(units), layer, limit)
                except NeuroExaptError as e:
                    logger.info("epoch %d: pruning '%s' skipped: %s", epoch, layer, e)
            if self.expand:
                try:
                    self.ne.measure(val)
                    self.ne.expand_layers(num_layers=1, optimizer=self.optimizer)
                except NeuroExaptError as e:
                    logger.info("epoch %d: expansion skipped: %s", epoch, e)
            if is_distributed():  # every rank holds rank 0's edits, weights and state
                synchronize(self.model, self.optimizer, since, snapshot)
                removed = broadcast(removed)
        except BaseException:
            snapshot.restore(self.model, self.optimizer)
            self._gate(example)
            raise
        self._rewrap()
        self._gate(example)
        return (snapshot, metric), removed

    def _rewrap(self) -> None:
        """A new DDP wrapper around the module as it is now (under DDP)."""
        if self._ddp is not None:
            self._ddp = rewrap(self._ddp, self.model)

    def _importance(self) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Per gate: the threshold factor ``2 (1 - q)`` and the per-unit scores of the custom
        importance metric (both empty without one; see the module docstring)."""
        report = self.ne.report
        if self.ne.importance_metric is None or report is None:
            return {}, {}
        scores: dict[str, float] = {}
        units: dict[str, torch.Tensor] = {}
        for layer, gate in self._gate_of.items():
            try:
                measured = report[layer]
            except KeyError:
                continue
            if "importance" in measured.metrics:
                scores[gate] = measured.metrics["importance"]
                if measured.unit_importance is not None:
                    units[gate] = torch.tensor(measured.unit_importance)
        if len(scores) < 2:
            return {}, units
        values = list(scores.values())
        last = len(values) - 1  # quantile = average rank / last: ties share one, mean 0.5
        weights = {g: 2.0 * (1.0 - _average_rank(v, values) / last) for g, v in scores.items()}
        logger.info("importance weights of the entropy threshold: %s",
                    ", ".join(f"{g} x{w:.2f}" for g, w in weights.items()))
        return weights, units

    def _keep_capacity(self, info: torch.Tensor, order: list[int], layer: str) -> list[int]:
        """``order`` cut so that the layer keeps a total gate capacity of at least H(Y).

        A layer's units are parallel Gaussian channels whose capacities (the gate information,
        nats) add up; by the data-processing inequality the layer passes at most that much
        information about the target, so it must keep at least the label entropy H(Y), the
        task's complexity measured on the validation targets (classification only).
        """
        if self.label_entropy is None:
            return order
        left = float(info.sum())
        kept: list[int] = []
        for unit in order:  # least informative first
            if left - float(info[unit]) < self.label_entropy:
                logger.info("'%s' keeps %d candidate units: its remaining gate capacity "
                            "%.3f nats must stay >= H(Y) = %.3f nats", layer,
                            len(order) - len(kept), left, self.label_entropy)
                break
            left -= float(info[unit])
            kept.append(unit)
        return kept

    def _maybe_rollback(self, pending: tuple[Snapshot, float] | None, metric: float,
                        val: list[Batch]) -> None:
        if pending is None:
            return None
        snapshot, before = pending
        if before - metric > self.rollback_threshold:
            self._absorb()
            snapshot.restore(self.model, self.optimizer)
            self._rewrap()
            self.feedback *= 0.5
            logger.info("validation fell from %.4f to %.4f: the last change is rolled back",
                        before, metric)
            self._gate(_head(val[0][0]))
        else:
            self.feedback = min(1.0, self.feedback * 1.25)
        return None

    def _resume(self, resume: bool | str | Path, example: Any, epochs: int
                ) -> tuple[float, int, tuple[Snapshot, float] | None]:
        """The model, optimizer, gates, scheduler, history and random state restored from
        ``resume.pt``; returns the best metric, the next epoch and the pending change. All or
        nothing: on any error the model and optimizer are left as they were."""
        if resume is True:
            if self.checkpoint_dir is None:
                raise ConfigError("resume=True reads <checkpoint_dir>/resume.pt: pass "
                                  "Trainer(..., checkpoint_dir=...) or resume='path/resume.pt'")
            path = self.checkpoint_dir / RESUME_FILE
        elif isinstance(resume, str | Path):
            path = Path(resume)
        else:
            raise ConfigError(f"resume must be True, False or a path, got {resume!r}")
        before = Snapshot.take(self.model, self.optimizer)
        try:
            state, pending = read_run(path, self.model, self.optimizer,
                                      lambda: copy.deepcopy(before.model))
            if int(state["epoch"]) >= epochs:
                raise ConfigError(f"resume: the run already trained {state['epoch']} epochs; "
                                  f"pass epochs > {state['epoch']} to train more")
            if (state["scheduler"] is None) != (self.scheduler is None):
                raise ConfigError("resume: the run was trained with"
                                  f"{'' if state['scheduler'] is not None else 'out'} a "
                                  "scheduler; build the Trainer as at the start of the run")
            self._gate(example)
            assert self.ib is not None and self._gate_opt is not None
            try:
                self.ib.load_state_dict(state["gates"])
                self._gate_opt.load_state_dict(state["gate_optimizer"])
            except (RuntimeError, ValueError, KeyError) as e:
                raise CheckpointError(f"the gates in '{path}' do not fit this model: {e}") from e
        except BaseException:
            self._absorb()
            before.restore(self.model, self.optimizer)
            raise
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.history = {k: [float(v) for v in vs] for k, vs in state["history"].items()}
        self.feedback = float(state["feedback"])
        torch.set_rng_state(state["rng"])
        self._rewrap()
        return float(state["best"]), int(state["epoch"]) + 1, pending

    def _save_run(self, epoch: int, best: float, pending: tuple[Snapshot, float] | None
                  ) -> None:
        assert self.checkpoint_dir is not None and self.ib is not None
        assert self._gate_opt is not None
        write_run(self.checkpoint_dir, self.model, self.optimizer, RunState(
            epoch, {k: list(v) for k, v in self.history.items()}, best, self.feedback,
            dict(self.ib.state_dict()), self._gate_opt.state_dict(),
            self.scheduler.state_dict() if self.scheduler is not None else None,
            torch.get_rng_state(), pending is not None), pending)

    def _checkpoint(self) -> None:
        assert self.checkpoint_dir is not None
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        plain = copy.deepcopy(self.model)
        if self.ib is not None:  # fold the gates' eval-mode scale into the copy
            self.ib.fold_into(plain)
            self.ib.strip(plain)
        save(plain, self.checkpoint_dir / "best.pt")

    def _log(self, train_loss: float, val_loss: float, metric: float, epoch: int,
             epochs: int, pruned: int) -> None:
        row = {"train_loss": train_loss, "val_loss": val_loss, "val_metric": metric,
               "parameters": float(count_parameters(self.model)),
               "threshold": self.threshold(epoch, epochs), "pruned_units": float(pruned)}
        for key, value in row.items():
            self.history[key].append(value)


def _average_rank(value: float, values: list[float]) -> float:
    """0-based rank of ``value`` among ``values``, ties given the mean of their ranks."""
    below = sum(v < value for v in values)
    return below + (sum(v == value for v in values) - 1) / 2


def _units(module: nn.Module) -> int:
    return int(getattr(module, "out_features", getattr(module, "out_channels",
                                                        getattr(module, "num_features", 1))))


def _norm_after(model: nn.Module, graph: Any, name: str) -> str | None:
    """The affine BatchNorm that alone reads ``name``'s output, if any.

    The gate goes after that BatchNorm: gated before it, the noise would enter its running
    statistics, which then no longer fit the noise-free eval-mode activations.
    """
    users = list(graph.node_of(name).users)
    if len(users) != 1 or users[0].op != "call_module":
        return None
    target = str(users[0].target)
    norm = model.get_submodule(target)
    if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.affine and \
            len(graph.calls.get(target, [])) == 1:
        return target
    return None


def _silent_blocks(info: dict[str, torch.Tensor], limit: float) -> list[str]:
    """Modules whose every gated layer passes less than ``limit`` nats in every unit, deepest
    first.

    These are the candidates for :func:`neuroexapt.remove_block`, which refuses (and the module
    is kept) unless the module is a residual block.
    """
    members: dict[str, list[str]] = {}
    for layer in info:
        parts = layer.split(".")
        for k in range(1, len(parts)):
            members.setdefault(".".join(parts[:k]), []).append(layer)
    return sorted((b for b, layers in members.items()
                   if all(float(info[n].max()) < limit for n in layers)),
                  key=lambda b: -b.count("."))


class _OnDevice:
    """A loader whose batches are moved to ``device`` (re-iterable, like the loader)."""

    def __init__(self, loader: Iterable[Batch], device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __iter__(self) -> Any:
        for x, y in self.loader:
            yield _to(x, self.device), y.to(self.device)


def _weights(model: nn.Module) -> list[nn.Parameter]:
    """The model's parameters but the relaxed choices' architecture parameters."""
    from neuroexapt.relax import weight_parameters

    return list(weight_parameters(model))


def _check_search(model: nn.Module, epochs: int, options: dict[str, Any] | None,
                  checkpoint_dir: str | None) -> tuple[int, dict[str, Any]]:
    """``search_epochs`` and the search options, checked against the model's choices."""
    from neuroexapt.relax import choices

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ConfigError(f"search_epochs must be an int >= 0, got {epochs!r}")
    relaxed = bool(choices(model)) if isinstance(model, nn.Module) else False
    if epochs and not relaxed:
        raise ConfigError("search_epochs needs a model with relaxed choices: call "
                          "ne.relax({layer: candidates | 'width' | 'depth'}) first")
    if relaxed and not epochs:
        raise ConfigError("the model has relaxed choices: pass search_epochs= to search them "
                          "(or call neuroexapt.relax.discretize(model) first)")
    options = dict(options or {})
    allowed = {"arch_lr", "tau", "penalty", "cost", "log_dir", "tensorboard"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(f"unknown search option(s) {', '.join(map(repr, unknown))}; valid: "
                          f"{', '.join(sorted(allowed))}")
    if epochs and "log_dir" not in options and checkpoint_dir is not None:
        options["log_dir"] = str(Path(checkpoint_dir) / "search")
    return epochs, options


def _args(x: Any) -> tuple[Any, ...]:
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def _to(x: Any, device: torch.device) -> Any:
    return x.to(device) if isinstance(x, torch.Tensor) else tuple(t.to(device) for t in x)


def _head(x: Any) -> Any:
    return x[:8] if isinstance(x, torch.Tensor) else tuple(t[:8] for t in x)


def _bar(epochs: range, progress: bool) -> Iterable[int]:
    if not progress:
        return epochs
    try:
        from tqdm import tqdm
    except ImportError:
        return epochs
    return tqdm(epochs, desc="epochs", unit="epoch")
