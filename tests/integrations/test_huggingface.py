"""DNM inside transformers.Trainer: the callback grows the model and migrates the Trainer's
optimizer in place (issue 14)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import neuroexapt
from neuroexapt.errors import ConfigError

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
from neuroexapt.integrations.huggingface import DNMTrainerCallback  # noqa: E402

EAGER = {"morphogenesis_interval": 1, "trigger_on_bottleneck": True, "record_every": 1}


def _data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (n, 8), generator=gen)
    labels = (ids[:, 0] > 30).long()  # learnable from the first token
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=4, intermediate_size=32,
                                     max_position_embeddings=16, num_labels=2)
    return transformers.BertForSequenceClassification(config)


def _args(tmp_path: Path, **kw: object) -> object:
    options = {"output_dir": str(tmp_path), "num_train_epochs": 3,
               "per_device_train_batch_size": 16, "eval_strategy": "epoch",
               "save_strategy": "no", "report_to": [], "use_cpu": True,
               "learning_rate": 1e-3, "logging_strategy": "no", "disable_tqdm": True}
    options.update(kw)
    return transformers.TrainingArguments(**options)


def test_the_callback_grows_the_model_and_the_optimizer_follows(tmp_path: Path) -> None:
    model = _model()
    start = sum(p.numel() for p in model.parameters())
    callback = DNMTrainerCallback(EAGER)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path),
                                   train_dataset=_data(96, 0), eval_dataset=_data(32, 1),
                                   callbacks=[callback])
    trainer.train()
    grown = sum(p.numel() for p in model.parameters())
    assert callback.results and grown > start
    assert grown == start + sum(r["parameters_added"] for r in callback.results)
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert {id(p) for g in inner.param_groups for p in g["params"]} == \
        {id(p) for p in model.parameters() if p.requires_grad}
    assert neuroexapt.get_history(model)
    out = model(input_ids=_data(4, 2)[0]["input_ids"][None])
    assert torch.isfinite(out.logits).all()


def test_without_evaluations_the_callback_says_what_to_set(tmp_path: Path) -> None:
    trainer = transformers.Trainer(model=_model(), args=_args(tmp_path, eval_strategy="no"),
                                   train_dataset=_data(32, 0),
                                   callbacks=[DNMTrainerCallback(EAGER)])
    with pytest.raises(ConfigError, match="eval_strategy"):
        trainer.train()


def test_several_processes_are_refused_before_training() -> None:
    """The Trainer's DDP wrapper is out of a callback's reach: refused, nothing built."""
    from types import SimpleNamespace

    callback = DNMTrainerCallback(EAGER)
    model = _model()
    args = SimpleNamespace(eval_strategy="epoch", world_size=2)
    with pytest.raises(ConfigError, match="one process"):
        callback.on_train_begin(args, None, None, model=model,
                                optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert callback.dnm is None
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
