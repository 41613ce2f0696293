"""The examples run end to end on tiny budgets and produce what they promise.

Each example's ``main(argv)`` runs in-process. dnm_fixed_test reads a fake CIFAR-10 written
here twice: as the ``.npz`` archives of the shared data folder and as torchvision's
``cifar-10-batches-py`` pickles.
"""

from __future__ import annotations

import importlib
import json
import pickle
from dataclasses import fields
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from neuroexapt.core import DNMConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
N_TRAIN, N_TEST = 80, 30


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch):
    """Import an example module by file name (the examples import their sibling ``_data``)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))

    def load(name: str) -> ModuleType:
        return importlib.import_module(name)

    return load


def _fake_cifar() -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    x_tr = rng.integers(0, 256, (N_TRAIN, 32, 32, 3), dtype=np.uint8)
    x_te = rng.integers(0, 256, (N_TEST, 32, 32, 3), dtype=np.uint8)
    return x_tr, rng.integers(0, 10, N_TRAIN), x_te, rng.integers(0, 10, N_TEST)


@pytest.fixture
def npz_dir(tmp_path: Path) -> Path:
    """The layout of the shared data folder: two training parts and a test archive."""
    x_tr, y_tr, x_te, y_te = _fake_cifar()
    folder = tmp_path / "npz"
    folder.mkdir()
    half = N_TRAIN // 2
    np.savez_compressed(folder / "cifar10_train_part1.npz", x=x_tr[:half],
                        y=y_tr[:half].astype(np.uint8))
    np.savez_compressed(folder / "cifar10_train_part2.npz", x=x_tr[half:],
                        y=y_tr[half:].astype(np.uint8))
    np.savez_compressed(folder / "cifar10_test.npz", x=x_te, y=y_te.astype(np.uint8))
    return folder


def _write_batch(path: Path, x: np.ndarray, y: np.ndarray, legacy_names: bool) -> None:
    # CIFAR's python format: rows of 3072 bytes, the R, G and B planes one after another.
    rows = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
    entry = {"batch_label": path.name, "labels": [int(v) for v in y], "data": rows,
             "filenames": [f"{i}.png" for i in range(len(x))]}
    data = pickle.dumps(entry, protocol=2)
    if legacy_names:  # as written by NumPy 1 (the original files use this spelling)
        data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(data)


@pytest.fixture
def pickle_root(tmp_path: Path) -> Path:
    """A torchvision root: ``root/cifar-10-batches-py/data_batch_1..5, test_batch``."""
    x_tr, y_tr, x_te, y_te = _fake_cifar()
    folder = tmp_path / "tv" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    per = N_TRAIN // 5
    for i in range(5):
        part = slice(i * per, (i + 1) * per)
        _write_batch(folder / f"data_batch_{i + 1}", x_tr[part], y_tr[part], legacy_names=i == 0)
    _write_batch(folder / "test_batch", x_te, y_te, legacy_names=False)
    return folder.parent


def test_both_cifar_layouts_load_the_same_arrays(example, npz_dir: Path,
                                                 pickle_root: Path) -> None:
    data = example("_data")
    from_npz = data.load_cifar10(npz_dir)
    for folder in (pickle_root, pickle_root / "cifar-10-batches-py"):
        from_pickles = data.load_cifar10(folder)
        for a, b in zip(from_npz, from_pickles, strict=True):
            np.testing.assert_array_equal(a, b)
    assert from_npz[0].shape == (N_TRAIN, 32, 32, 3) and from_npz[0].dtype == np.uint8
    assert from_npz[1].dtype == np.int64


def test_pickle_reader_refuses_code(example, tmp_path: Path) -> None:
    data = example("_data")
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    path.parent.mkdir()
    path.write_bytes(pickle.dumps({"data": print}))  # a global a CIFAR batch never holds
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load builtins\.print"):
        data._read_pickle_batch(path)


def _tiny_cifar_args(data_dir: Path, out: Path, epochs: int) -> list[str]:
    return ["--data-dir", str(data_dir), "--epochs", str(epochs), "--subset", "60",
            "--batch-size", "16", "--width", "4", "--probe-batch-size", "8", "--interval", "1",
            "--trigger-on-bottleneck", "--threads", "1", "--device", "cpu", "--out", str(out),
            "--quiet"]


def test_dnm_fixed_test_on_npz(example, npz_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert example("dnm_fixed_test").main(_tiny_cifar_args(npz_dir, out, epochs=2)) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert f"({N_TEST} images)" in printed and "parameters:" in printed
    assert summary["test_images"] == N_TEST and 0.0 <= summary["test_accuracy"] <= 1.0
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2]
    # 60 images: 6 held out for validation and the probe, 54 trained on.
    assert summary["epochs"][0]["val"]["accuracy"] in {k / 6 for k in range(7)}
    # Triggered on the bottleneck at epoch 1: the model grew and the event was written.
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert events == summary["events"] and len(events) >= 1
    assert events[0]["epoch"] == 1 and events[0]["params_after"] > events[0]["params_before"]
    assert summary["parameters_after"] > summary["parameters_before"]
    assert summary["epochs"][-1]["parameters"] == summary["parameters_after"]


def test_dnm_fixed_test_on_cifar_batches_py(example, pickle_root: Path, tmp_path: Path,
                                            capsys) -> None:
    out = tmp_path / "run"
    assert example("dnm_fixed_test").main(_tiny_cifar_args(pickle_root, out, epochs=1)) == 0
    assert "test accuracy: " in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["test_images"] == N_TEST


def test_dnm_fixed_test_without_data(example, tmp_path: Path, capsys) -> None:
    assert example("dnm_fixed_test").main(["--data-dir", str(tmp_path), "--quiet"]) == 2
    assert "no CIFAR-10 in" in capsys.readouterr().err


def test_augment_keeps_shape_and_pixels(example) -> None:
    import torch

    fixed = example("dnm_fixed_test")
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    out = fixed.augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    # A crop of the zero-padded image: every value is a pixel of the image or padding.
    for a, b in zip(x, out, strict=True):
        assert set(b.unique().tolist()) <= set(a.unique().tolist()) | {0}


@pytest.mark.parametrize("model", ["resnet", "mlp"])
def test_dnm_custom_model_grows_the_users_model(example, model: str, tmp_path: Path,
                                                capsys) -> None:
    events = tmp_path / "events.jsonl"
    argv = ["--model", model, "--epochs", "2", "--subset", "300", "--events", str(events),
            "--quiet"]
    assert example("dnm_custom_model").main(argv) == 0
    printed = capsys.readouterr().out
    cls = "DigitsResNet" if model == "resnet" else "DigitsMLP"
    assert f"model class after growth: {cls}" in printed
    before, after = (int(v) for v in
                     printed.split("parameters: ")[1].split("\n")[0].split(" -> "))
    assert after > before  # checked at epoch 2 (interval 2) and grown at a bottleneck
    lines = events.read_text().splitlines()
    assert len(lines) >= 1 and json.loads(lines[0])["epoch"] == 2


def test_advanced_config_sets_every_key(example) -> None:
    config = example("dnm_advanced_config").advanced_config()
    assert set(config) == {f.name for f in fields(DNMConfig)}
    assert DNMConfig.from_dict(config).to_dict() == config


def test_dnm_advanced_config_prints_events_and_config(example, capsys) -> None:
    adv = example("dnm_advanced_config")
    assert adv.main(["--epochs", "2", "--subset", "300", "--quiet",
                     "--strategy", "activation_based"]) == 0
    printed = capsys.readouterr().out
    assert "events:" in printed and "kind" in printed
    shown = json.loads(printed.split("configuration (dnm.config.to_dict()):\n")[1])
    assert shown == adv.advanced_config("activation_based", 2)


def test_neuroexapt_quickstart_runs(example, capsys) -> None:
    module = example("neuroexapt_quickstart")
    assert module.main(["--epochs", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "test accuracy" in out
    assert "monitored entropy per epoch: [" in out and out.count(", ") >= 2
    assert "prune_layers('importance < 0.05')" in out and "expand_layers('mutate', 2)" in out


def test_neuroexapt_relax_searches_and_discretises(example, capsys, tmp_path: Path) -> None:
    module = example("neuroexapt_relax")
    assert module.main(["--search-epochs", "2", "--epochs", "1", "--quiet",
                        "--log-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "chosen {'features.3':" in out and "kernel of features.3: (" in out
    assert "MACs per image" in out and "test accuracy" in out
    assert (tmp_path / "history.jsonl").read_text().count("\n") == 2
    assert (tmp_path / "choices.png").stat().st_size > 0


@pytest.fixture
def fashion_dir(tmp_path: Path) -> Path:
    """The shared data folder's Fashion-MNIST archives, small and random."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "fashion"
    folder.mkdir()
    for name, n in (("fashion_mnist_train.npz", N_TRAIN), ("fashion_mnist_test.npz", N_TEST)):
        np.savez_compressed(folder / name,
                            x=rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
                            y=rng.integers(0, 10, n).astype(np.uint8))
    return folder


def _figures(printed: str) -> tuple[int, int, float]:
    before, after = (int(v) for v in
                     printed.split("parameters ")[-1].split(" (")[0].split(" -> "))
    return before, after, float(printed.split("test accuracy ")[1].split()[0])


def test_neuroexapt_fashion_mnist_on_npz(example, fashion_dir: Path, capsys) -> None:
    module = example("neuroexapt_fashion_mnist")
    argv = ["--data-dir", str(fashion_dir), "--epochs", "1", "--subset", "60", "--val", "12",
            "--width", "4", "--batch-size", "16", "--threads", "1", "--quiet"]
    assert module.main(argv) == 0
    printed = capsys.readouterr().out
    assert "fashion_mnist: 48 training, 12 validation, 30 test images of shape (1, 28, 28)" \
        in printed
    before, after, acc = _figures(printed)
    expected = sum(p.numel() for p in module.cnn(1, 28, width=4).parameters())
    assert before == expected  # conv 4 - conv 4 - conv 8 - linear 8*7*7 -> 10
    assert after == before  # one epoch: the Trainer never prunes after the last epoch
    assert acc in {round(k / N_TEST, 4) for k in range(N_TEST + 1)}  # in [0, 1], of 30
    assert "epoch 1: train loss " in printed and "epoch 2" not in printed


def test_neuroexapt_fashion_mnist_prunes_cifar10(example, npz_dir: Path, capsys) -> None:
    # Two epochs and a threshold above the gates' initial 4.5 nats: the step after epoch 1
    # removes the largest share a step may (25% of each conv), for real.
    module = example("neuroexapt_fashion_mnist")
    argv = ["--data-dir", str(npz_dir), "--dataset", "cifar10", "--epochs", "2",
            "--subset", "40", "--val", "8", "--width", "4", "--batch-size", "16",
            "--entropy-threshold", "8", "--quiet"]
    assert module.main(argv) == 0
    printed = capsys.readouterr().out
    before, after, acc = _figures(printed)
    assert before == sum(p.numel() for p in module.cnn(3, 32, width=4).parameters())
    assert "conv widths [4, 4, 8] -> [3, 3, 6]" in printed
    # Smaller tensors: convs 3x3 (3->3, 3->3, 3->6, no bias) with their BatchNorms, and the
    # linear layer's 6 * 8 * 8 inputs.
    assert after == 9 * (3 * 3 + 3 * 3 + 3 * 6) + 2 * (3 + 3 + 6) + 6 * 64 * 10 + 10 < before
    assert acc in {round(k / N_TEST, 4) for k in range(N_TEST + 1)}


def test_neuroexapt_fashion_mnist_without_data(example, tmp_path: Path, capsys) -> None:
    module = example("neuroexapt_fashion_mnist")
    assert module.main(["--data-dir", str(tmp_path), "--quiet"]) == 2
    assert "no Fashion-MNIST in" in capsys.readouterr().err
