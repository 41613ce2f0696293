"""DNMConfig: every key of the design document's "advanced configuration", validated once."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from typing import Any

import pytest
from torch import nn

from neuroexapt.core import DNMFramework
from neuroexapt.errors import ConfigError
from neuroexapt.metrics.analyze import BOTTLENECK_METRICS
from neuroexapt.policy import DIVISION_STRATEGIES, DNMConfig

# The "高级配置" (advanced configuration) dict of the first design document, verbatim.
DOCUMENT_CONFIG: dict[str, Any] = {
    # 触发控制 (trigger control)
    "morphogenesis_interval": 3,
    "max_morphogenesis_per_epoch": 1,
    "performance_improvement_threshold": 0.01,
    # 分裂策略 (division strategy)
    "neuron_division_strategy": "hybrid",  # 'gradient_based', 'activation_based', 'hybrid'
    "division_noise_scale": 0.1,
    "progressive_activation_epochs": 5,
    # 瓶颈检测 (bottleneck detection)
    "bottleneck_detection_metrics": [
        "gradient_variance",
        "activation_diversity",
        "information_flow",
        "performance_sensitivity",
    ],
    # 安全机制 (safety)
    "rollback_enabled": True,
    "performance_drop_threshold": 0.05,
    "max_architecture_changes": 10,
}

# A non-default value of the documented type for every key, to check each reaches its field.
OTHER_VALUES: dict[str, Any] = {
    "morphogenesis_interval": 7,
    "max_morphogenesis_per_epoch": 2,
    "performance_improvement_threshold": 0.2,
    "neuron_division_strategy": "gradient_based",
    "division_noise_scale": 0.0,
    "progressive_activation_epochs": 0,
    "bottleneck_detection_metrics": ["information_flow"],
    "rollback_enabled": False,
    "performance_drop_threshold": 1.0,
    "max_architecture_changes": 0,
}


def test_document_dict_is_accepted_and_each_key_reaches_its_field() -> None:
    cfg = DNMConfig.from_dict(DOCUMENT_CONFIG)
    for key, value in DOCUMENT_CONFIG.items():
        expected = tuple(value) if isinstance(value, list) else value
        assert getattr(cfg, key) == expected, key


@pytest.mark.parametrize("key", sorted(OTHER_VALUES))
def test_each_document_key_alone_sets_only_its_field(key: str) -> None:
    cfg = DNMConfig.from_dict({key: OTHER_VALUES[key]})
    value = OTHER_VALUES[key]
    assert getattr(cfg, key) == (tuple(value) if isinstance(value, list) else value)
    default = DNMConfig()
    changed = [f.name for f in fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)]
    assert changed == [key]


def test_document_values_are_the_dataclass_defaults() -> None:
    # The document's example shows the defaults; DNMFramework(model) behaves as documented.
    assert DNMConfig.from_dict(DOCUMENT_CONFIG) == DNMConfig()
    assert DNMConfig.from_dict(None) == DNMConfig()
    assert DNMConfig().bottleneck_detection_metrics == BOTTLENECK_METRICS
    assert set(DIVISION_STRATEGIES) == {"gradient_based", "activation_based", "hybrid"}


def test_documented_types() -> None:
    cfg = DNMConfig()
    for key in ("morphogenesis_interval", "max_morphogenesis_per_epoch",
                "progressive_activation_epochs", "max_architecture_changes"):
        assert type(getattr(cfg, key)) is int, key
    for key in ("performance_improvement_threshold", "division_noise_scale",
                "performance_drop_threshold"):
        assert type(getattr(cfg, key)) is float, key
    assert type(cfg.rollback_enabled) is bool
    assert isinstance(cfg.bottleneck_detection_metrics, tuple)
    # ints are accepted where floats are documented
    assert DNMConfig.from_dict({"performance_drop_threshold": 0}).performance_drop_threshold == 0


def test_the_facade_converts_the_dict_once() -> None:
    dnm = DNMFramework(nn.Linear(2, 2), DOCUMENT_CONFIG)
    assert dnm.config == DNMConfig()
    assert DNMFramework(nn.Linear(2, 2), DNMConfig(morphogenesis_interval=5)).config \
        .morphogenesis_interval == 5


def test_the_facade_hands_each_key_to_the_part_that_uses_it() -> None:
    dnm = DNMFramework(nn.Linear(2, 2), OTHER_VALUES)
    assert dnm.trigger.config is dnm.config  # interval, threshold, budget, ...
    assert dnm.division.strategy == "gradient_based"
    assert dnm.division.noise_scale == 0.0
    assert dnm.division.progressive_epochs == 0
    assert dnm.analyzer.metrics == ("information_flow",)


def test_config_is_frozen() -> None:
    cfg = DNMConfig()
    with pytest.raises(AttributeError):
        cfg.morphogenesis_interval = 1  # type: ignore[misc]


# ----------------------------------------------------------------------------- errors


def test_unknown_key_is_named_with_the_valid_keys() -> None:
    bad = {**DOCUMENT_CONFIG, "morphogenesis_intervall": 3}
    with pytest.raises(ConfigError, match="unknown DNM config key 'morphogenesis_intervall'") \
            as info:
        DNMConfig.from_dict(bad)
    message = str(info.value)
    for f in fields(DNMConfig):
        assert f.name in message
    with pytest.raises(ConfigError, match="'morphogenesis_intervall'"):
        DNMFramework(nn.Linear(2, 2), bad)  # rejected at construction, not at first use


def test_config_of_the_wrong_type() -> None:
    with pytest.raises(ConfigError, match="config must be a dict or DNMConfig, got list"):
        DNMConfig.from_dict([("morphogenesis_interval", 3)])  # type: ignore[arg-type]


BAD_VALUES = [
    # (key, value, what the message must contain besides the key)
    ("neuron_division_strategy", "foo", "gradient_based, activation_based, hybrid"),
    ("neuron_division_strategy", "Hybrid", "gradient_based, activation_based, hybrid"),
    ("division_noise_scale", -0.1, ">= 0"),
    ("division_noise_scale", float("nan"), ">= 0"),
    ("division_noise_scale", "0.1", ">= 0"),
    ("performance_improvement_threshold", -0.01, r"\[0, 1\]"),
    ("performance_improvement_threshold", 1.5, r"\[0, 1\]"),
    ("performance_drop_threshold", -0.05, r"\[0, 1\]"),
    ("performance_drop_threshold", 2, r"\[0, 1\]"),
    ("performance_drop_threshold", float("inf"), r"\[0, 1\]"),
    ("division_fraction", 0.0, r"\(0, 1\]"),
    ("morphogenesis_interval", 0, ">= 1"),
    ("morphogenesis_interval", -3, ">= 1"),
    ("morphogenesis_interval", 2.5, ">= 1"),
    ("max_morphogenesis_per_epoch", 0, ">= 1"),
    ("max_architecture_changes", -1, ">= 0"),
    ("progressive_activation_epochs", -1, ">= 0"),
    ("evaluation_window", 0, ">= 1"),
    ("plateau_window", 0, ">= 1"),
    ("max_parameters", 0, ">= 1"),
    ("bottleneck_detection_metrics", ["gradient_variance", "entropy"],
     "gradient_variance, activation_diversity, information_flow, performance_sensitivity"),
    ("bottleneck_detection_metrics", [],
     "gradient_variance, activation_diversity, information_flow, performance_sensitivity"),
    ("bottleneck_detection_metrics", "gradient_variance",
     "gradient_variance, activation_diversity, information_flow, performance_sensitivity"),
    # bools are not numbers, and ints are not bools
    ("rollback_enabled", 1, "True or False"),
    ("rollback_enabled", "yes", "True or False"),
    ("trigger_on_bottleneck", 0, "True or False"),
    ("allow_deepen", None, "True or False"),
    ("morphogenesis_interval", True, ">= 1"),
    ("max_architecture_changes", False, ">= 0"),
    ("performance_drop_threshold", True, r"\[0, 1\]"),
    ("division_noise_scale", True, ">= 0"),
]


@pytest.mark.parametrize(("key", "value", "choices"), BAD_VALUES,
                         ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_bad_value_names_the_key_and_the_valid_choices(key: str, value: Any, choices: str) -> None:
    with pytest.raises(ConfigError) as info:
        DNMConfig.from_dict({key: value})
    message = str(info.value)
    assert key in message
    assert re.search(choices, message), message
    shown = repr(value[-1]) if isinstance(value, list) and value else repr(value)
    assert shown in message, message


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="neuron_division_strategy"):
        DNMConfig(neuron_division_strategy="foo")


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("config", [DOCUMENT_CONFIG, OTHER_VALUES,
                                    {"max_parameters": 10_000, "trigger_on_bottleneck": True}])
def test_to_dict_round_trip(config: dict[str, Any]) -> None:
    cfg = DNMConfig.from_dict(config)
    data = cfg.to_dict()
    assert set(data) == {f.name for f in fields(DNMConfig)}
    assert isinstance(data["bottleneck_detection_metrics"], list)
    assert json.loads(json.dumps(data)) == data  # plain data
    assert DNMConfig.from_dict(data) == cfg
    assert DNMConfig.from_dict(json.loads(json.dumps(data))) == cfg
    for key, value in config.items():
        assert data[key] == value
