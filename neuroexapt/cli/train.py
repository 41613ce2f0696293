"""``neuroexapt train``, ``report`` and ``analyze``: runs from a configuration file.

``train --config run.yaml`` builds the model and the data the file names
(:mod:`neuroexapt.cli.config`), trains with DNM (``method: dnm``), the information-theoretic
Trainer (``method: trainer``) or plainly (``none``), and writes a run folder:
``history.jsonl`` and ``tensorboard/`` (per epoch), ``events.jsonl`` (DNM's changes),
``curves.png``, ``last.pt`` (model, optimizer and policy, :func:`neuroexapt.save`) and
``config.yaml``; a Trainer run also ``best.pt`` and, after every epoch, ``resume.pt``.
``train --resume`` continues a run from its ``last.pt`` (a Trainer run from its
``resume.pt``). ``report RUN_DIR``
prints the events table and writes the plot again; ``analyze`` prints the bottleneck report
of a model (optionally a checkpoint) on data.
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import neuroexapt
from neuroexapt.cli.config import RunConfig, load_run_config
from neuroexapt.errors import ConfigError
from neuroexapt.train.sinks import RunLogger, plot_history

logger = logging.getLogger(__name__)

__all__ = ["analyze_command", "build_data", "build_model", "report_command", "train_command"]

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
              torch.Tensor]


def _digits_cnn(**kw: Any) -> nn.Module:
    from neuroexapt.train.digits import DigitsCNN

    return DigitsCNN(**kw)


BUILT_IN: dict[str, Callable[..., nn.Module]] = {"digits_cnn": _digits_cnn}


def build_model(name: str, args: dict[str, Any]) -> Callable[[], nn.Module]:
    """The factory of the model ``name`` (built-in, or ``package.module:factory``)."""
    if name in BUILT_IN:
        fn = BUILT_IN[name]
    elif ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"model '{name}': cannot import {attr} from {module_name}: "
                              f"{e}") from e
    else:
        raise ConfigError(f"unknown model '{name}'; built-in: {', '.join(BUILT_IN)}, or "
                          "'package.module:factory'")

    def factory() -> nn.Module:
        model = fn(**args)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model '{name}' returned {type(model).__name__}, not an "
                              "nn.Module")
        return model

    return factory


def _folder(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of a torchvision-style folder (``<path>/<class>/<image>``), in [0, 1]."""
    from PIL import Image

    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    if not classes:
        raise ConfigError(f"data.path '{path}' has no class folders (<path>/<class>/<image>)")
    xs, ys = [], []
    for label, name in enumerate(classes):
        for f in sorted((path / name).iterdir()):
            if f.suffix.lower() not in (".png", ".jpg", ".jpeg", ".bmp", ".gif"):
                continue
            img = torch.tensor(list(Image.open(f).convert("RGB").getdata()),
                               dtype=torch.float32)
            w, h = Image.open(f).size
            xs.append(img.view(h, w, 3).permute(2, 0, 1) / 255.0)
            ys.append(label)
    if not xs:
        raise ConfigError(f"data.path '{path}' holds no images")
    if len({x.shape for x in xs}) != 1:
        raise ConfigError(f"the images of '{path}' differ in size; resize them to one size")
    return torch.stack(xs), torch.tensor(ys)


def build_data(cfg: RunConfig, seed: int) -> Split:
    """(x_train, y_train, x_val, y_val, x_test, y_test) of the configuration."""
    data = cfg.data
    source = data.get("source", "digits")
    if source == "digits":
        from neuroexapt.train.digits import load_digits

        x, y, x_te, y_te = load_digits(seed)
    elif source == "npz":
        from neuroexapt.train import npz

        loader = {"cifar10": npz.load_cifar10, "fashion_mnist": npz.load_fashion_mnist}
        name = data.get("dataset", "cifar10")
        if name not in loader:
            raise ConfigError(f"{cfg.path}: data.dataset must be cifar10 or fashion_mnist, got "
                              f"{name!r}")
        x, y, x_te, y_te = loader[name](data["path"], data.get("subset"), seed)
    else:
        root = Path(data["path"])
        if not root.is_dir():
            raise ConfigError(f"{cfg.path}: data.path '{root}' is not a folder")
        x, y = _folder(root / "train" if (root / "train").is_dir() else root)
        x_te, y_te = _folder(root / "test") if (root / "test").is_dir() else (x[:0], y[:0])
    if data.get("subset") and source != "npz":
        x, y = x[: data["subset"]], y[: data["subset"]]
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=gen)
    cut = len(y) - round(float(data.get("val_fraction", 0.15)) * len(y))
    tr, va = order[:cut], order[cut:]
    if len(tr) == 0 or len(va) == 0:
        raise ConfigError(f"{cfg.path}: data.val_fraction leaves an empty training or "
                          f"validation split of {len(y)} samples")
    return x[tr], y[tr], x[va], y[va], x_te, y_te


def _batches(x: torch.Tensor, y: torch.Tensor, size: int, seed: int | None
             ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.arange(len(y)) if seed is None else torch.randperm(
        len(y), generator=torch.Generator().manual_seed(seed))
    return [(x[i], y[i]) for i in order.split(size)]


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    if len(y) == 0:
        return float("nan")
    was = model.training
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x[i : i + 512]).argmax(1) == y[i : i + 512]).sum())
                   for i in range(0, len(y), 512))
    model.train(was)
    return hits / len(y)


def _optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    lr = float(cfg.train.get("lr", 0.05 if cfg.train.get("optimizer", "sgd") == "sgd" else 1e-3))
    if cfg.train.get("optimizer", "sgd") == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def train_command(config: str | None, resume: str | None, progress: bool = True) -> int:
    """``neuroexapt train``; returns the exit code."""
    if (config is None) == (resume is None):
        raise ConfigError("neuroexapt train needs --config run.yaml, or --resume RUN_DIR")
    run = Path(resume) if resume else None
    cfg = load_run_config(config if config else run / "config.yaml")  # type: ignore[operator]
    run = run or Path(cfg.run_dir)
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe_file = run / ".writable"
        probe_file.write_text("")
        probe_file.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write the run folder '{run}': {e}; set run_dir to a "
                          "writable folder") from e
    if config:
        shutil.copyfile(config, run / "config.yaml")
    seed = int(cfg.train.get("seed", 0))
    torch.manual_seed(seed)
    factory = build_model(cfg.model, cfg.model_args)
    x_tr, y_tr, x_va, y_va, x_te, y_te = build_data(cfg, seed)
    start_epoch, policy_state, rng = 1, None, None
    if resume and cfg.method != "trainer":  # a Trainer resumes itself from its resume.pt
        last = run / "last.pt"
        if not last.exists():
            raise ConfigError(f"--resume {run}: no last.pt in the run folder")
        ckpt = neuroexapt.load(last, factory, lambda m: _optimizer(cfg, m))
        model, optimizer = ckpt
        assert optimizer is not None
        state = ckpt.policy_state or {}
        done = int(state.get("epoch", 0))  # the epoch the checkpoint was written after
        policy_state = state.get("dnm")
        rng = state.get("rng")  # absent in checkpoints of earlier versions
        rows = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines() if x]
        rows = [r for r in rows if int(r["epoch"]) <= done]  # a kill between the two writes
        start_epoch = done + 1
    else:
        model = factory()
        optimizer = _optimizer(cfg, model)
        rows = []
    sink = RunLogger(run)
    for row in rows:  # the resumed run's history continues in the same file
        sink.log(int(row["epoch"]), **{k: v for k, v in row.items() if k != "epoch"})
    batch = int(cfg.data.get("batch_size", 64))
    epochs = int(cfg.train.get("epochs", 10))
    val = _batches(x_va, y_va, 256, None)
    dnm = None
    if cfg.method == "dnm":
        from neuroexapt.core import DNMFramework

        if policy_state is not None:  # the policy's state holds the events: written anew
            (run / "events.jsonl").unlink(missing_ok=True)
        dnm = DNMFramework(model, cfg.dnm, optimizer=optimizer, probe=val[:4],
                           events_path=run / "events.jsonl", seed=seed)
        if policy_state is not None:
            dnm.load_state_dict(policy_state)
    if rng is not None:
        torch.set_rng_state(rng)  # the random state the run had after the checkpoint's epoch
    if cfg.method == "trainer":
        _fit_trainer(cfg, model, optimizer, sink, run, epochs, (x_tr, y_tr), val, batch, seed,
                     resume=resume is not None)
    epochs_range = range(start_epoch, epochs + 1) if cfg.method != "trainer" else range(0)
    bar: Any = epochs_range
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(epochs_range, desc="epochs", unit="epoch")
        except ImportError:
            pass
    for epoch in bar:
        train_batches = _batches(x_tr, y_tr, batch, seed * 1000 + epoch)
        model.train()
        total = 0.0
        for xb, yb in train_batches:
            optimizer.zero_grad()
            batch_loss = F.cross_entropy(model(xb), yb)
            batch_loss.backward()
            optimizer.step()
            total += float(batch_loss.detach())
        loss = total / len(train_batches)
        acc = _accuracy(model, x_va, y_va)
        if dnm is not None:
            dnm.update_caches()
            dnm.record_performance(acc)
            go, _ = dnm.should_trigger_morphogenesis(epoch, {"loss": loss}, {"accuracy": acc})
            if go:
                dnm.execute_morphogenesis(epoch)
        params = sum(p.numel() for p in model.parameters())
        sink.log(epoch, train_loss=loss, val_accuracy=acc, parameters=params)
        neuroexapt.save(model, run / "last.pt", optimizer, policy=_RunState(epoch, dnm))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(val=f"{acc:.3f}", params=params)
    sink.close()
    if dnm is not None:
        dnm.close()
    test = _accuracy(model, x_te, y_te)
    print(f"run folder {run}: {len(sink.rows)} epochs, validation accuracy "
          f"{sink.rows[-1]['val_accuracy']:.4f}, test accuracy {test:.4f}, "
          f"{sum(p.numel() for p in model.parameters())} parameters")
    report_command(str(run))
    return 0


def _fit_trainer(cfg: RunConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                 sink: RunLogger, run: Path, epochs: int,
                 train: tuple[torch.Tensor, torch.Tensor],
                 val: list[tuple[torch.Tensor, torch.Tensor]], batch: int, seed: int,
                 resume: bool = False) -> None:
    """``method: trainer``: one ``Trainer.fit`` over every epoch (its schedule spans them);
    it writes its state after every epoch to ``resume.pt``, which ``--resume`` continues."""
    trainer = neuroexapt.Trainer(model=model, optimizer=optimizer, progress=False,
                                 checkpoint_dir=str(run), **cfg.trainer)
    history = trainer.fit(_batches(*train, batch, seed), val, epochs=epochs, resume=resume)
    for i in range(len(history["val_metric"])):
        sink.log(i + 1, train_loss=history["train_loss"][i],
                 val_accuracy=history["val_metric"][i], parameters=history["parameters"][i])
    neuroexapt.save(model, run / "last.pt", trainer.optimizer)


class _RunState:
    """What a run's checkpoint keeps besides the model: the epoch it was written after, DNM's
    state (``neuroexapt.save(..., policy=)``) and torch's global random state."""

    def __init__(self, epoch: int, dnm: Any) -> None:
        self.epoch, self.dnm = epoch, dnm

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "rng": torch.get_rng_state(),
                "dnm": self.dnm.state_dict() if self.dnm is not None else None}


def report_command(run_dir: str) -> int:
    """``neuroexapt report``: the events table of a run folder, and its plot."""
    run = Path(run_dir)
    history = run / "history.jsonl"
    if not history.exists():
        raise ConfigError(f"'{run}' is not a run folder (no history.jsonl)")
    rows = [json.loads(x) for x in history.read_text().splitlines() if x]
    events_path = run / "events.jsonl"
    events = [json.loads(x) for x in events_path.read_text().splitlines() if x] \
        if events_path.exists() else []
    print(f"{'epoch':>5}  {'change':<18} {'layer':<24} {'parameters':>21}")
    for e in events:
        print(f"{e['epoch']:>5}  {e['kind']:<18} {e['layer']:<24} "
              f"{e['params_before']:>10} -> {e['params_after']:<8}")
    if not events:
        print("(no architecture change)")
    try:
        out = plot_history(rows, run / "curves.png", metric="val_accuracy",
                           params="parameters",
                           events=[(int(e["epoch"]), e["kind"]) for e in events])
        print(f"plot: {out}")
    except ConfigError as e:
        print(f"no plot: {e}")
    return 0


def analyze_command(model_name: str, data: str, checkpoint: str | None, batches: int) -> int:
    """``neuroexapt analyze``: the bottleneck report of a model on data."""
    factory = build_model(model_name, {})
    if checkpoint:
        model, _ = neuroexapt.load(checkpoint, factory)
    else:
        model = factory()
    source = {"digits": {"source": "digits"}}.get(data)
    if source is None:
        path = Path(data)
        source = {"source": "folder", "path": data} if path.is_dir() else None
    if source is None:
        raise ConfigError(f"--data must be 'digits' or an image folder, got {data!r}")
    cfg = RunConfig(model=model_name, data=source, path="--data")
    x, y, *_ = build_data(cfg, 0)
    report = neuroexapt.analyze(model, _batches(x, y, 128, 0), batches=batches)
    print(report.table())
    return 0
