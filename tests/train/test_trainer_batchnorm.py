"""Trainer and BatchNorm: gates after the norm, statistics re-measured without gate noise."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import neuroexapt
from neuroexapt.errors import ConfigError
from neuroexapt.train.bottleneck import InformationBottleneck
from neuroexapt.train.digits import DigitsCNN, load_digits


def _loaders() -> tuple[list, list]:
    x_tr, y_tr, x_te, y_te = load_digits(0)
    train = [(x_tr[i:i + 64], y_tr[i:i + 64]) for i in range(0, 512, 64)]
    return train, [(x_te[:128], y_te[:128])]


def test_gates_sit_after_the_batchnorm_that_reads_a_conv() -> None:
    torch.manual_seed(0)
    _, val = _loaders()
    trainer = neuroexapt.Trainer(DigitsCNN(width=4), info_weight=0.1, entropy_threshold=0.0,
                                 progress=False)
    trainer._gate(val[0][0][:8])
    assert trainer.ib is not None
    # conv 0 -> BN 1 and conv 3 -> BN 4: the gates go on the norms; the Linear has no norm
    assert trainer.ib.layers == ("features.1", "features.4", "classifier.0")


def test_deterministic_gates_pass_mu_in_training_mode() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    ib = InformationBottleneck(model, ["0"], init_log_sigma2=2.0)  # very noisy gates
    x = torch.randn(16, 4)
    model.train()
    with ib.deterministic():
        a, b = model(x), model(x)
    assert torch.equal(a, b)
    assert not torch.equal(model(x), model(x))  # the noise is back after the block
    model.eval()
    assert torch.equal(model(x), a)


def test_recalibration_measures_noise_free_statistics_and_keeps_momentum() -> None:
    torch.manual_seed(0)
    train, val = _loaders()
    model = DigitsCNN(width=4)
    trainer = neuroexapt.Trainer(model, info_weight=0.1, entropy_threshold=0.0, progress=False,
                                 recalibrate_batches=4)
    trainer._gate(val[0][0][:8])
    assert trainer.ib is not None
    with torch.no_grad():  # make the gates very noisy, as a strong regulariser does
        for p in trainer.ib.log_sigma2.values():
            p.fill_(2.0)
    bn = model.features[4]
    model.train()
    with torch.no_grad():  # statistics polluted by noise
        for x, _ in train:
            model(x)
    polluted = bn.running_var.clone()
    trainer._recalibrate(train)
    assert bn.momentum == 0.1 and model.features[1].momentum == 0.1
    assert int(bn.num_batches_tracked) == 4
    # expected: the plain average over 4 batches of the noise-free batch statistics
    feats: list[torch.Tensor] = []
    hook = model.features[3].register_forward_hook(lambda m, a, o: feats.append(o))
    model.eval()
    trainer.ib._deterministic = True
    with torch.no_grad():
        bn_in = model.features[1]
        bn_in.train()  # the first norm's batch statistics, as recalibration used them
        for x, _ in train[:4]:
            model.features[:4](x)
    trainer.ib._deterministic = False
    hook.remove()
    n = feats[0].numel() / feats[0].shape[1]
    expected = torch.stack([f.var(dim=(0, 2, 3)) * n / (n - 1) for f in feats]).mean(0)
    assert torch.allclose(bn.running_var, expected, rtol=1e-3, atol=1e-6)
    assert not torch.allclose(polluted, expected, rtol=0.05)


def test_recalibrate_batches_is_validated() -> None:
    with pytest.raises(ConfigError, match="recalibrate_batches"):
        neuroexapt.Trainer(DigitsCNN(width=4), recalibrate_batches=-1)


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.fc2(torch.relu(self.fc1(x))))


def test_a_residual_block_whose_gates_all_pass_nothing_is_removed() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), _Block(8), _Block(8), nn.Linear(8, 3))
    x = torch.randn(32, 4)
    val = [(x, torch.randint(0, 3, (32,)))]
    trainer = neuroexapt.Trainer(model, info_weight=0.1, entropy_threshold=1.0, progress=False)
    trainer._gate(x[:8])
    assert trainer.ib is not None
    assert set(trainer.ib.layers) == {"0", "1.fc1", "1.fc2", "2.fc1", "2.fc2"}
    with torch.no_grad():  # block 2 passes no information; the rest keeps 4.5 nats per unit
        trainer.ib.log_sigma2["2/fc1"].fill_(12.0)
        trainer.ib.log_sigma2["2/fc2"].fill_(12.0)
    before = sum(p.numel() for p in model.parameters())
    pending, removed = trainer._evolve(3, 4, val, 0.5)  # threshold 1.0 nats at epoch 3 of 4
    assert pending is not None and removed == 16
    assert not any(n.startswith("2.") for n, _ in model.named_parameters())
    assert sum(p.numel() for p in model.parameters()) == before - 2 * (8 * 8 + 8)
    assert [r.op for r in neuroexapt.get_history(model)] == ["remove_block"]
    assert model[1].fc1.out_features == 8  # the informative block is untouched
    assert model(x).shape == (32, 3)


def test_a_layer_keeps_gate_capacity_of_at_least_the_label_entropy() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(60, 4)
    val = [(x, torch.arange(60) % 3)]  # balanced: H(Y) = log 3 = 1.0986 nats
    trainer = neuroexapt.Trainer(model, info_weight=0.1, entropy_threshold=1.0,
                                 max_prune_fraction=1.0, progress=False)
    trainer._gate(x[:8])
    trainer.label_entropy = 1.0986
    assert trainer.ib is not None
    with torch.no_grad():  # every unit passes 0.5 nats: all are below the 1.0 threshold
        mu = trainer.ib.mu["0"]
        trainer.ib.log_sigma2["0"].copy_(torch.log(mu.square() / (math.exp(1.0) - 1)))
    assert torch.allclose(trainer.ib.unit_information()["0"], torch.full((8,), 0.5))
    _, removed = trainer._evolve(3, 4, val, 0.5)
    # without the bound 7 units would go; 3 units keep 1.5 >= 1.0986 nats, 2 would keep 1.0
    assert removed == 5 and model[0].out_features == 3
