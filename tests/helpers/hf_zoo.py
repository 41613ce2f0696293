"""Hugging Face transformers models from small configs, random weights, no downloads.

``build(name)`` returns the model in eval mode and its positional example inputs.
"""

from __future__ import annotations

from typing import Any

import torch

VOCAB = 100
NAMES = ["bert", "distilbert", "roberta", "gpt2", "llama", "vit", "swin", "convnext", "resnet",
         "mobilenetv2", "efficientnet", "mobilevit"]


def _text() -> tuple[torch.Tensor, ...]:
    return (torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0)),)


def _image() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)


def build(name: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """The model ``name`` (one of :data:`NAMES`) and its example inputs."""
    import transformers as T

    torch.manual_seed(0)
    text = {"vocab_size": VOCAB, "max_position_embeddings": 64}
    configs: dict[str, tuple[Any, Any, Any]] = {
        "bert": (T.BertForSequenceClassification, T.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            num_labels=3, **text), _text),
        "distilbert": (T.DistilBertForSequenceClassification, T.DistilBertConfig(
            dim=32, n_layers=2, n_heads=4, hidden_dim=64, num_labels=3, **text), _text),
        "roberta": (T.RobertaForSequenceClassification, T.RobertaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            num_labels=3, **text), _text),
        "gpt2": (T.GPT2LMHeadModel, T.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
            bos_token_id=0, eos_token_id=1, tie_word_embeddings=True), _text),
        "llama": (T.LlamaForCausalLM, T.LlamaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, **text), _text),
        "vit": (T.ViTForImageClassification, T.ViTConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64, num_labels=10), _image),
        "swin": (T.SwinForImageClassification, T.SwinConfig(
            image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
            window_size=4, num_labels=10), _image),
        "convnext": (T.ConvNextForImageClassification, T.ConvNextConfig(
            hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=10), _image),
        "resnet": (T.ResNetForImageClassification, T.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
            num_labels=10), _image),
        "mobilenetv2": (T.MobileNetV2ForImageClassification, T.MobileNetV2Config(
            image_size=32, depth_multiplier=0.25, num_labels=10), _image),
        "efficientnet": (T.EfficientNetForImageClassification, T.EfficientNetConfig(
            image_size=32, width_coefficient=0.25, depth_coefficient=0.2, hidden_dim=320,
            num_labels=10), _image),
        "mobilevit": (T.MobileViTForImageClassification, T.MobileViTConfig(
            image_size=32, patch_size=2, hidden_sizes=[16, 24, 32],
            neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], num_attention_heads=2,
            num_labels=10), _image),
    }
    cls, config, inputs = configs[name]
    return cls(config).eval(), inputs()
