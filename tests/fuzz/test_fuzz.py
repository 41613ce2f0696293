"""Random architectures, every edit on every layer: committed with the function kept and a
consistent optimizer, or refused with nothing changed (issue 15; the CI profile)."""

from __future__ import annotations

from helpers import fuzz


def test_every_edit_on_every_layer_of_random_networks_commits_or_is_refused_cleanly() -> None:
    counts, failures = fuzz.run(models=20, seed=0)
    assert not failures, "\n".join(failures)
    assert counts["ok"] > 150 and counts["refused"] > 20  # both outcomes are exercised
    assert sum(counts.values()) > 250


def test_the_generator_covers_the_layer_kinds() -> None:
    kinds: set[str] = set()
    for seed in range(20):
        model, x = fuzz.random_model(seed)
        assert model(*x).shape == (3, 3)
        kinds |= {type(m).__name__ for m in model.modules()}
    assert {"Conv2d", "ConvTranspose2d", "Linear", "Embedding", "BatchNorm2d", "GroupNorm",
            "LayerNorm", "SelfAttention", "Residual", "Concat", "Scale", "MaxPool2d"} <= kinds


def test_function_preserving_edits_keep_outputs_to_float_rounding() -> None:
    errors = fuzz.numerics(models=6, seed=0)
    assert len(errors["float32"]) > 20 and len(errors["float64"]) > 20
    assert max(errors["float32"]) < 1e-5  # verify=True's float32 tolerance
    assert max(errors["float64"]) < 1e-12
