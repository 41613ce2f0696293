"""Run configurations of ``neuroexapt train``: a YAML file, checked key by key.

Every error names the key and its line in the file. The keys::

    model: digits_cnn            # a built-in name, or "package.module:factory"
    model_args: {width: 4}       # keyword arguments of the factory
    data:
      source: digits             # digits | npz | folder
      path: ../shared/data       # npz: the folder of <dataset>_*.npz; folder: an image folder
      dataset: cifar10           # npz: cifar10 or fashion_mnist
      subset: 5000               # training samples used (default all)
      batch_size: 64
      val_fraction: 0.15         # held out of the training split for validation
    train:
      epochs: 10
      optimizer: sgd             # sgd | adam
      lr: 0.05
      seed: 0
    method: dnm                  # dnm | trainer | none
    dnm: {...}                   # DNMConfig keys (the first design document)
    trainer: {...}               # neuroexapt.Trainer keyword arguments
    run_dir: runs/my-run
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuroexapt.errors import ConfigError

__all__ = ["RunConfig", "load_run_config"]

_TOP = {"model", "model_args", "data", "train", "method", "dnm", "trainer", "run_dir"}
_DATA = {"source", "path", "dataset", "subset", "batch_size", "val_fraction"}
_TRAIN = {"epochs", "optimizer", "lr", "seed"}
METHODS = ("dnm", "trainer", "none")
SOURCES = ("digits", "npz", "folder")


@dataclass
class RunConfig:
    """A checked run configuration (see the module docstring)."""

    model: str
    model_args: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    method: str = "dnm"
    dnm: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    run_dir: str = "runs/train"
    path: str = ""


class _Lines:
    """Line numbers of the keys of a YAML document (1-based), by key path."""

    def __init__(self, text: str) -> None:
        import yaml

        self.lines: dict[tuple[str, ...], int] = {}
        try:
            root = yaml.compose(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"the run configuration is not valid YAML: {e}") from e
        self._walk(root, ())

    def _walk(self, node: Any, path: tuple[str, ...]) -> None:
        import yaml

        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = (*path, str(key.value))
                self.lines[sub] = key.start_mark.line + 1
                self._walk(value, sub)

    def at(self, *path: str) -> str:
        line = self.lines.get(tuple(path))
        return f"line {line}" if line else "the file"


def _unknown(keys: Any, allowed: set[str], where: tuple[str, ...], lines: _Lines,
             path: str) -> None:
    for key in keys:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else \
                f"; valid keys: {', '.join(sorted(allowed))}"
            name = ".".join((*where, str(key)))
            raise ConfigError(f"{path}, {lines.at(*where, str(key))}: unknown key '{name}'{hint}")


def _number(section: dict[str, Any], key: str, kind: type, where: str, lines: _Lines,
            path: str, low: float) -> None:
    if key not in section:
        return
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            kind is int and not isinstance(value, int)) or value < low:
        raise ConfigError(f"{path}, {lines.at(where, key)}: '{where}.{key}' must be "
                          f"{'an int' if kind is int else 'a number'} >= {low}, got {value!r}")


def load_run_config(path: str | os.PathLike[str]) -> RunConfig:
    """Read and check a run configuration.

    Raises:
        ConfigError: an unreadable file, invalid YAML, an unknown or mistyped key, a bad
            value; the message names the key and its line.
    """
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read the run configuration '{p}': {e}") from e
    lines = _Lines(text)
    data = yaml.safe_load(text)
    where = str(p)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the run configuration must be a mapping of keys")
    _unknown(data, _TOP, (), lines, where)
    if "model" not in data or not isinstance(data["model"], str) or not data["model"]:
        raise ConfigError(f"{where}, {lines.at('model')}: 'model' (a built-in name or "
                          "'module:factory') is required")
    for key in ("model_args", "data", "train", "dnm", "trainer"):
        if key in data and not isinstance(data[key], dict):
            raise ConfigError(f"{where}, {lines.at(key)}: '{key}' must be a mapping, got "
                              f"{data[key]!r}")
    section = data.get("data", {}) or {}
    _unknown(section, _DATA, ("data",), lines, where)
    source = section.get("source", "digits")
    if source not in SOURCES:
        raise ConfigError(f"{where}, {lines.at('data', 'source')}: 'data.source' must be one "
                          f"of {', '.join(SOURCES)}, got {source!r}")
    if source in ("npz", "folder") and not section.get("path"):
        raise ConfigError(f"{where}, {lines.at('data')}: data.source={source} needs "
                          "'data.path'")
    _number(section, "subset", int, "data", lines, where, 1)
    _number(section, "batch_size", int, "data", lines, where, 1)
    _number(section, "val_fraction", float, "data", lines, where, 0.0)
    train = data.get("train", {}) or {}
    _unknown(train, _TRAIN, ("train",), lines, where)
    _number(train, "epochs", int, "train", lines, where, 1)
    _number(train, "lr", float, "train", lines, where, 0.0)
    _number(train, "seed", int, "train", lines, where, 0)
    if train.get("optimizer", "sgd") not in ("sgd", "adam"):
        raise ConfigError(f"{where}, {lines.at('train', 'optimizer')}: 'train.optimizer' must "
                          f"be sgd or adam, got {train['optimizer']!r}")
    method = data.get("method", "dnm")
    if method not in METHODS:
        raise ConfigError(f"{where}, {lines.at('method')}: 'method' must be one of "
                          f"{', '.join(METHODS)}, got {method!r}")
    dnm = data.get("dnm", {}) or {}
    if method == "dnm":
        from neuroexapt.policy.config import DNMConfig

        try:
            DNMConfig.from_dict(dnm)
        except ConfigError as e:
            bad = next((k for k in dnm if f"'{k}'" in str(e)), None)
            at = lines.at("dnm", bad) if bad else lines.at("dnm")
            raise ConfigError(f"{where}, {at}: {e}") from e
    return RunConfig(model=data["model"], model_args=data.get("model_args") or {},
                     data=section, train=train, method=method, dnm=dnm,
                     trainer=data.get("trainer") or {},
                     run_dir=str(data.get("run_dir", "runs/train")), path=where)
