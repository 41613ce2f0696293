"""Models as users bring them: compiled and wrapped, in other dtypes, with tied weights,
subclassed layers; and edits that would leave a model unable to run (issue 12)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from helpers.asserts import (
    assert_model_unchanged,
    assert_optimizer_unchanged,
    assert_same_function,
    snapshot_model,
    snapshot_optimizer,
)
from torch import nn

import neuroexapt
from neuroexapt.errors import ConfigError, FunctionPreservationError, SurgeryError
from neuroexapt.graph import handlers
from neuroexapt.ops.transaction import check_same_function

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
TOKENS = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))


def cnn(conv: type[nn.Conv2d] = nn.Conv2d) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(conv(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         conv(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4)).eval()


# ----------------------------------------------------------------------------- wrappers


@pytest.mark.parametrize("name", ["0", "_orig_mod.0"])
def test_a_compiled_model_is_edited_through_its_wrapper(name: str) -> None:
    model = cnn()
    compiled = torch.compile(model, backend="eager")
    before = compiled(X).detach()
    record = neuroexapt.widen(compiled, name, 4, example_inputs=X)
    assert record.target == "0" and model[0].out_channels == 12  # the original module
    assert_same_function(before, compiled(X), X)  # the wrapper recompiles by itself
    assert neuroexapt.get_history(compiled) == neuroexapt.get_history(model) == [record]
    graph = neuroexapt.trace(compiled, X)
    assert graph.group_of("0").size == 12


@pytest.mark.parametrize("name", ["0", "module.0"])
def test_a_data_parallel_model_is_edited_through_its_wrapper(name: str) -> None:
    model = cnn()
    wrapped = nn.DataParallel(model)
    before = wrapped(X).detach()
    neuroexapt.narrow(wrapped, name, remove=[0, 1], example_inputs=X)
    assert model[0].out_channels == 6 and wrapped(X).shape == before.shape


@pytest.fixture
def process_group(tmp_path: object) -> Iterator[None]:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_distributed_data_parallel_is_refused_with_the_fix(process_group: None) -> None:
    model = cnn()
    ddp = nn.parallel.DistributedDataParallel(model)
    snap = snapshot_model(model)
    with pytest.raises(ConfigError, match=r"edit model.module .*wrap it again"):
        neuroexapt.widen(ddp, "module.0", 4, example_inputs=X)
    assert_model_unchanged(model, snap)
    neuroexapt.widen(ddp.module, "0", 4, example_inputs=X)  # what the message says works
    assert model[0].out_channels == 12


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_model_in_another_dtype_takes_float32_example_inputs(dtype: torch.dtype) -> None:
    model = cnn().to(dtype)
    before = model(X.to(dtype)).detach()
    neuroexapt.widen(model, "0", 4, example_inputs=X)  # float32 inputs, cast
    assert model[0].weight.dtype == dtype and model[0].out_channels == 12
    if dtype == torch.float64:
        assert_same_function(before, model(X.double()), X)
    assert neuroexapt.get_history(model)[0].inputs == [([2, 3, 8, 8], str(dtype))]


# ----------------------------------------------------------------------------- tied weights


class TiedLM(nn.Module):
    """embedding -> residual MLP -> LayerNorm -> output layer tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.fc = nn.Linear(16, 16)
        self.ln = nn.LayerNorm(16)
        self.head = nn.Linear(16, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h = self.emb(t)
        return self.head(self.ln(h + self.fc(h)))


def test_tied_weights_stay_tied_when_units_are_removed() -> None:
    torch.manual_seed(0)
    model = TiedLM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(TOKENS).sum().backward()
    opt.step()
    neuroexapt.narrow(model, "emb", remove=[0, 5], example_inputs=TOKENS, optimizer=opt)
    assert model.head.weight is model.emb.weight and model.emb.weight.shape == (20, 14)
    assert model.fc.weight.shape == (14, 14) and model.ln.weight.shape == (14,)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert sum(p is model.emb.weight for p in params) == 1
    assert {id(p) for p in params} == {id(p) for p in model.parameters()}
    assert opt.state[model.emb.weight]["exp_avg"].shape == (20, 14)
    model(TOKENS).sum().backward()  # trains on
    opt.step()


def test_widening_tied_weights_is_refused_and_changes_nothing() -> None:
    torch.manual_seed(0)
    model = TiedLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    snap, opt_snap = snapshot_model(model), snapshot_optimizer(opt)
    with pytest.raises(SurgeryError, match=r"tied weights.*narrow.*untie"):
        neuroexapt.widen(model, "emb", 16, example_inputs=TOKENS, optimizer=opt)
    assert_model_unchanged(model, snap)
    assert_optimizer_unchanged(opt, opt_snap)
    assert model.head.weight is model.emb.weight


def test_tied_weights_couple_the_groups_that_share_them() -> None:
    torch.manual_seed(0)
    model = TiedLM()
    graph = neuroexapt.trace(model, TOKENS)
    group = graph.group_of("emb")
    assert {m.path for m in group.members} >= {"emb.weight", "head.weight", "fc.weight"}


# ----------------------------------------------------------------------------- subclasses


class MyConv(nn.Conv2d):
    """A subclass that changes nothing the layer computes, with its own __init__ arguments
    (as transformers' EfficientNetDepthwiseConv2d has)."""

    def __init__(self, c_in: int, c_out: int, k: int, padding: int = 0) -> None:
        super().__init__(c_in, c_out, k, padding=padding)


class ScaledConv(nn.Conv2d):
    """A subclass with its own forward: traced into, not treated as a plain Conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_a_subclass_of_a_builtin_layer_uses_its_handler() -> None:
    model = cnn(MyConv)
    before = model(X).detach()
    neuroexapt.widen(model, "0", 4, example_inputs=X)
    assert_same_function(before, model(X), X)
    assert model[0].out_channels == 12 and type(model[0]) is MyConv
    neuroexapt.deepen(model, "3", verify=True)  # the new layer is a plain Conv2d
    assert_same_function(before, model(X), X)
    assert handlers.is_registered_leaf(MyConv(1, 1, 1))
    assert not handlers.is_registered_leaf(ScaledConv(1, 1, 1))


# ----------------------------------------------------------------------------- never broken


def test_a_depthwise_conv_reading_the_model_input_is_frozen() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, groups=3), nn.ReLU(),
                          nn.Conv2d(3, 8, 1), nn.Flatten(), nn.Linear(512, 4)).eval()
    snap = snapshot_model(model)
    with pytest.raises(SurgeryError, match=r"depthwise convolution '0' has as many channels"):
        neuroexapt.widen(model, "0", 3, example_inputs=X)
    assert_model_unchanged(model, snap)
    neuroexapt.widen(model, "2", 4, example_inputs=X)  # the rest of the model still resizes


class Rescale(nn.Module):
    """Multiplies by a per-channel parameter of fixed size."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale[:, None, None]


@pytest.fixture
def wrong_handler() -> Iterator[None]:
    """A handler that claims Rescale passes units through, while its parameter is fixed."""
    saved = dict(handlers._REGISTRY)
    neuroexapt.register_handler(Rescale, neuroexapt.graph.ElementwiseHandler())
    try:
        yield
    finally:
        handlers._REGISTRY.clear()
        handlers._REGISTRY.update(saved)
        handlers._bump()


@pytest.mark.parametrize("edit", ["widen", "widen-unverified", "narrow"])
def test_an_edit_that_leaves_a_model_unable_to_run_is_refused(wrong_handler: None,
                                                              edit: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), Rescale(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4)).eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    snap, opt_snap = snapshot_model(model), snapshot_optimizer(opt)
    with pytest.raises(SurgeryError, match=r"no longer runs on its example inputs"):
        if edit == "narrow":
            neuroexapt.narrow(model, "0", remove=[1], example_inputs=X, optimizer=opt)
        else:
            neuroexapt.widen(model, "0", 2, example_inputs=X, optimizer=opt,
                             verify=edit == "widen")
    assert_model_unchanged(model, snap)
    assert_optimizer_unchanged(opt, opt_snap)
    assert neuroexapt.get_history(model) == []


def test_verification_is_relative_at_every_output_scale() -> None:
    small = [torch.full((4,), 1e-3)]
    check_same_function(small, [small[0] * (1 + 1e-6)], "an edit")  # 1e-6 relative: kept
    with pytest.raises(FunctionPreservationError, match="exceeds the tolerance"):
        check_same_function(small, [small[0] * (1 + 1e-4)], "an edit")  # 1e-4 relative
    check_same_function([torch.zeros(3)], [torch.zeros(3)], "an edit")


# ----------------------------------------------------------------------------- reductions


class Reduced(nn.Module):
    """conv -> ReLU -> a reduction across the channels -> linear."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(36, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        h = {"max": lambda: h.max(dim=1)[0], "amax": lambda: torch.amax(h, 1),
             "mean": lambda: h.mean(dim=1), "sum": lambda: h.sum(1),
             "logsumexp": lambda: torch.logsumexp(h, 1)}[self.op]()
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("op", ["max", "amax", "mean", "sum", "logsumexp"])
def test_reductions_across_the_units_allow_what_keeps_them(op: str) -> None:
    torch.manual_seed(0)
    model = Reduced(op).eval()
    before = model(X).detach()
    if op in ("sum", "logsumexp"):  # any new unit changes a sum
        snap = snapshot_model(model)
        with pytest.raises(SurgeryError, match=rf"'{op}' at node .* sums over these 8 units"):
            neuroexapt.widen(model, "conv", 8, example_inputs=X)
        assert_model_unchanged(model, snap)
    else:  # copies of every unit keep a mean, copies of any keep an extremum
        neuroexapt.widen(model, "conv", 8, example_inputs=X)
        assert_same_function(before, model(X), X)
        with pytest.raises(SurgeryError, match=r"strategy='zero'"):
            neuroexapt.widen(model, "conv", 8, example_inputs=X, strategy="zero")
    neuroexapt.narrow(model, "conv", remove=[0, 3], example_inputs=X)  # removing is exact
    assert model(X).shape == before.shape
    assert neuroexapt.widen(model, "conv", 2, example_inputs=X, allow_approximate=True,
                            verify=False).op == "widen"


# ----------------------------------------------------------------------------- nn.Transformer*


class Encoder(nn.Module):
    """Embedding -> nn.TransformerEncoder (2 layers) -> mean over tokens -> Linear."""

    def __init__(self, norm_first: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(16, 3)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.fc(self.enc(self.emb(t)).mean(1))


@pytest.mark.parametrize("norm_first", [False, True])
def test_pytorch_transformer_layers_are_traced_through(norm_first: bool) -> None:
    torch.manual_seed(0)
    model = Encoder(norm_first).eval()
    opt = torch.optim.Adam(model.parameters())
    before = model(TOKENS).detach()
    neuroexapt.widen(model, "emb", 16, example_inputs=TOKENS, optimizer=opt)  # model dim
    attn = model.enc.layers[0].self_attn
    assert attn.embed_dim == 32 and attn.head_dim == 16
    neuroexapt.widen(model, "enc.layers.0.linear1", 8, optimizer=opt)  # feed-forward width
    assert model.enc.layers[0].linear1.out_features == 40
    assert_same_function(before, model(TOKENS), TOKENS)
    neuroexapt.narrow(model, "enc.layers.1.linear1", remove=[0, 1], optimizer=opt)
    neuroexapt.narrow(model, "emb", remove=[0, 1], optimizer=opt)
    model.train()
    loss = model(TOKENS).sum()
    loss.backward()
    opt.step()
    assert all(p.grad is not None for p in model.parameters())


# ----------------------------------------------------------------------------- ConvNeXt


class Permute(nn.Module):
    """torchvision.ops.misc.Permute."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.permute(x, self.dims)


class LayerNorm2d(nn.LayerNorm):
    """torchvision's LayerNorm2d: a LayerNorm subclass whose forward normalises channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias,
                                           self.eps)
        return x.permute(0, 3, 1, 2)


class ChannelsFirstLayerNorm(nn.Module):
    """transformers' ConvNextLayerNorm (channels_first): no LayerNorm base class at all."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n))
        self.normalized_shape = (n,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape,
                                           self.weight, self.bias, 1e-6)
        return x.permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    """torchvision's ConvNeXt block: depthwise 7x7, permutes around a LayerNorm, an MLP, a
    per-channel layer scale, and the residual stream."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim), Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim), nn.GELU(),
            nn.Linear(4 * dim, dim), Permute([0, 3, 1, 2]))
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_scale * self.block(x) + x


def convnext() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 4, 4), LayerNorm2d(16), CNBlock(16), CNBlock(16),
                         ChannelsFirstLayerNorm(16), nn.Conv2d(16, 32, 2, 2), CNBlock(32),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(32, 10)).eval()


@pytest.mark.parametrize("layer", ["0", "2.block.0", "2.block.3", "5", "6.block.3"])
def test_the_convnext_block_edits_correctly(layer: str) -> None:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = convnext()
    opt = torch.optim.AdamW(model.parameters())
    before = model(x).detach()
    group = neuroexapt.trace(model, x).group_of(layer)
    assert group.resizable, group.frozen
    neuroexapt.widen(model, layer, group.size, example_inputs=x, optimizer=opt)  # every unit
    assert_same_function(before, model(x), x)
    neuroexapt.narrow(model, layer, remove=[0, 1], optimizer=opt)
    model.train()
    model(x).sum().backward()
    opt.step()
    if layer == "0":  # the residual stream: stem, both blocks, both LayerNorms, layer scales
        size = 2 * 16 - 2
        assert model[2].layer_scale.shape == (size, 1, 1) and model[1].normalized_shape == (size,)
        assert model[4].normalized_shape == (size,) and model[3].block[0].groups == size


# ----------------------------------------------------------------------------- concrete tracing


class Checks(nn.Module):
    """Control flow on tensor values, which symbolic tracing cannot follow."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 3:
            raise ValueError("expected 3 channels")
        h = self.conv(x)
        for _ in range(int(h.shape[1]) // 8):  # a loop bound read from a shape
            h = torch.relu(h)
        return self.fc(h.mean(dim=(2, 3)))


def test_a_model_with_control_flow_is_traced_with_concrete_values() -> None:
    torch.manual_seed(0)
    model = Checks().eval()
    calls: list[str] = []
    model.conv.register_forward_hook(lambda *_: calls.append("hook"))
    before = model(X).detach()
    calls.clear()
    graph = neuroexapt.trace(model, X)
    assert len(calls) == 1  # one run to read shapes, as for any model: recording is silent
    assert graph.group_of("conv").resizable
    neuroexapt.widen(model, "conv", 8, example_inputs=X)
    assert_same_function(before, model(X), X)
    assert model.conv.out_channels == 16


def test_a_grouped_convolution_resizes_its_outputs_group_by_group() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1, groups=4),
                          nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, 6, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()
    before = model(X).detach()
    assert neuroexapt.trace(model, X).group_of("2").segments == 4
    neuroexapt.widen(model, "2", 8, example_inputs=X)  # two more channels in each group
    assert_same_function(before, model(X), X)
    assert model[2].out_channels == 20 and model[2].groups == 4
    with pytest.raises(SurgeryError, match="equal segments"):
        neuroexapt.narrow(model, "2", remove=[0, 1])  # both from the first group
    neuroexapt.narrow(model, "2", remove=[0, 5, 10, 15])
    assert model[2].out_channels == 16 and model(X).shape == before.shape
    snap = snapshot_model(model)
    with pytest.raises(SurgeryError, match="reads these channels group by group"):
        neuroexapt.widen(model, "0", 4)
    assert_model_unchanged(model, snap)


class ReadsItsWeights(nn.Module):
    """Model code that reads attributes of its layers in forward (as transformers' ViT casts
    its input to ``self.projection.weight.dtype``)."""

    def __init__(self) -> None:
        super().__init__()
        self.projection = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.projection.weight.dtype)
        h = self.projection(x)
        assert h.shape[-1] == self.projection.out_features
        return self.head(torch.relu(h))


@pytest.mark.parametrize("edit", ["deepen", "skip"])
def test_wrapped_layers_still_answer_for_the_original_layer(edit: str) -> None:
    torch.manual_seed(0)
    model, x = ReadsItsWeights(), torch.randn(3, 4)
    before = model(x)
    if edit == "deepen":
        neuroexapt.deepen(model, "projection", example_inputs=x, verify=True)
    else:
        neuroexapt.add_skip(model, "projection", "head", example_inputs=x)
    assert model.projection.weight.shape == (8, 4) and model.projection.out_features == 8
    assert_same_function(before, model(x), x)
    with pytest.raises(AttributeError):
        model.projection.no_such_attribute  # noqa: B018


def test_deepen_inserts_an_identity_after_a_transformers_conv1d() -> None:
    transformers = pytest.importorskip("transformers")
    conv1d = transformers.pytorch_utils.Conv1D
    torch.manual_seed(0)
    model = nn.Sequential(conv1d(12, 6), nn.GELU(), conv1d(3, 12))
    x = torch.randn(2, 5, 6)
    before = model(x)
    neuroexapt.deepen(model, "0", example_inputs=x, verify=True)
    assert_same_function(before, model(x), x)
    assert sum(p.numel() for p in model.parameters()) > 6 * 12 + 12 + 12 * 3 + 3
