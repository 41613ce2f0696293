"""Random traceable architectures, and every edit on every layer of each (issue 15).

``random_model(seed)`` builds a network from a random plan: an image stem (convolutions,
depthwise and grouped convolutions, BatchNorm, GroupNorm, activations, residual additions,
concatenations, pooling, transposed convolutions, a per-channel scale parameter) or a token
stem (an embedding), then a head (flatten or a mean over positions, Linear layers,
LayerNorm, attention written with tensor ops, reductions). ``run_case`` applies one edit and
classifies the outcome:

* ``ok``: the edit committed, the model runs, one training step with the migrated optimizer
  works, the optimizer holds exactly the model's parameters (and, for ``widen``/``deepen``
  with ``verify=True``, the function was kept: the edit checks it);
* ``refused``: a ``NeuroExaptError``, with the model's tensors, the optimizer's state and the
  edit history exactly as before;
* ``FAILED: ...``: anything else (a raw error, a change left behind by a refusal, a model
  that no longer trains).

    python -m helpers.fuzz --models 1000 --seed 0     # from tests/: the long profile
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import neuroexapt
from neuroexapt.errors import NeuroExaptError

EDITS = ("widen", "narrow", "deepen")


class Scale(nn.Module):
    """A learned per-channel scale (as ConvNeXt's layer scale)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(c, 1, 1) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Concat(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], 1)


class SelfAttention(nn.Module):
    """Attention as users write it: q, k, v projections split into heads of 4."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (f(x).view(b, s, -1, 4).transpose(1, 2) for f in (self.q, self.k, self.v))
        att = (q @ k.transpose(-2, -1) / 2.0).softmax(-1) @ v
        return self.o(att.transpose(1, 2).reshape(b, s, -1))


class Net(nn.Module):
    def __init__(self, stem: nn.Module, head: nn.Module, tokens: bool, reduce: str) -> None:
        super().__init__()
        self.stem, self.head, self.tokens, self.reduce = stem, head, tokens, reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        if self.tokens:
            return self.head(h).mean(1)
        h = h.amax((2, 3)) if self.reduce == "amax" else h.mean((2, 3)) \
            if self.reduce == "mean" else h.flatten(1)
        return self.head(h)


def _conv_block(rng: random.Random, c_in: int) -> tuple[nn.Module, int]:
    kind = rng.choice(["conv", "conv", "depthwise", "grouped", "residual", "concat", "convt",
                       "pool", "scale"])
    c = rng.choice([4, 6, 8])
    if kind == "depthwise":
        return nn.Sequential(nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in),
                             nn.BatchNorm2d(c_in), nn.ReLU()), c_in
    if kind == "grouped" and c_in % 2 == 0:
        return nn.Sequential(nn.Conv2d(c_in, 2 * c, 3, padding=1, groups=2), nn.GELU()), 2 * c
    if kind == "residual":
        norm = nn.GroupNorm(2, c_in) if c_in % 2 == 0 else nn.BatchNorm2d(c_in)
        return Residual(nn.Sequential(nn.Conv2d(c_in, c_in, 3, padding=1), norm,
                                      nn.ReLU())), c_in
    if kind == "concat":
        return Concat(nn.Conv2d(c_in, c, 1), nn.Sequential(nn.Conv2d(c_in, c, 3, padding=1),
                                                           nn.ReLU())), 2 * c
    if kind == "convt":
        return nn.Sequential(nn.ConvTranspose2d(c_in, c, 3, padding=1), nn.ReLU()), c
    if kind == "pool":
        return nn.Sequential(nn.Conv2d(c_in, c, 3, padding=1), nn.MaxPool2d(2)), c
    if kind == "scale":
        return nn.Sequential(nn.Conv2d(c_in, c, 1), Scale(c)), c
    return nn.Sequential(nn.Conv2d(c_in, c, rng.choice([1, 3]), padding="same"),
                         nn.BatchNorm2d(c), nn.ReLU()), c


def random_model(seed: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A random network and example inputs for it (see the module docstring)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    tokens = rng.random() < 0.25
    if tokens:
        d = rng.choice([8, 12, 16])
        stem: nn.Module = nn.Embedding(20, d)
        x = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(seed))
        layers: list[nn.Module] = []
        for _ in range(rng.randint(1, 3)):
            kind = rng.choice(["mlp", "attention", "norm"])
            if kind == "attention":
                layers.append(Residual(SelfAttention(d)))
            elif kind == "norm":
                layers.append(nn.LayerNorm(d))
            else:
                h = rng.choice([8, 16, 24])
                layers.append(Residual(nn.Sequential(nn.Linear(d, h), nn.GELU(),
                                                     nn.Linear(h, d))))
        head = nn.Sequential(*layers, nn.Linear(d, 3))
        return Net(stem, head, True, "").eval(), (x,)
    c, blocks = 3, []
    for _ in range(rng.randint(1, 4)):
        block, c = _conv_block(rng, c)
        blocks.append(block)
    reduce = rng.choice(["flatten", "mean", "amax"])
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        features = Net(nn.Sequential(*blocks), nn.Identity(), False, reduce)(x).shape[1]
    hidden = rng.choice([8, 10, 16])
    head = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(),
                         *( [nn.Dropout(0.0)] if rng.random() < 0.3 else []),
                         nn.Linear(hidden, 3))
    return Net(nn.Sequential(*blocks), head, False, reduce).eval(), (x,)


def layers_of(model: nn.Module) -> list[str]:
    kinds = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)
    return [n for n, m in model.named_modules() if isinstance(m, kinds)]


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> Any:
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = {i: {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
             for i, s in enumerate(opt.state.values())}
    params = [id(p) for g in opt.param_groups for p in g["params"]]
    return tensors, state, params, list(neuroexapt.get_history(model))


def _same(a: Any, b: Any) -> bool:
    ta, sa, pa, ha = a
    tb, sb, pb, hb = b
    if ta.keys() != tb.keys() or any(ta[k].shape != tb[k].shape or not torch.equal(ta[k], tb[k])
                                     for k in ta):
        return False
    if pa != pb or ha != hb or sa.keys() != sb.keys():
        return False
    return all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


def run_case(seed: int, layer: str, edit: str) -> str:
    """One edit of one layer of ``random_model(seed)``: ``ok``, ``refused`` or ``FAILED: ...``."""
    model, x = random_model(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    _loss(model, x).backward()  # some optimizer state to migrate
    opt.step()
    opt.zero_grad()
    model.eval()
    before = _snapshot(model, opt)
    try:
        if edit == "widen":
            group = neuroexapt.trace(model, x).group_of(layer)
            by = group.size if group.normalizers else 2 * group.segments * group.atom
            neuroexapt.widen(model, layer, by, example_inputs=x, optimizer=opt, verify=True,
                             allow_approximate=bool(group.sums))
        elif edit == "narrow":
            group = neuroexapt.trace(model, x).group_of(layer)
            per = group.size // group.segments
            neuroexapt.narrow(model, layer, remove=[s * per + t for s in range(group.segments)
                                                    for t in range(group.atom)],
                              example_inputs=x, optimizer=opt)
        else:
            neuroexapt.deepen(model, layer, example_inputs=x, optimizer=opt, verify=True)
    except NeuroExaptError as e:
        if not _same(before, _snapshot(model, opt)):
            return f"FAILED: refused ({type(e).__name__}) but changed the model or optimizer"
        return "refused"
    except Exception as e:  # a raw error is a failure whatever it is
        return f"FAILED: raw {type(e).__name__}: {e}"
    try:
        model.train()
        _loss(model, x).backward()
        opt.step()
    except Exception as e:
        return f"FAILED: no training step after the edit: {type(e).__name__}: {e}"
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    if held != {id(p) for p in model.parameters()}:
        return "FAILED: the optimizer does not hold exactly the model's parameters"
    return "ok"


def _loss(model: nn.Module, x: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return F.cross_entropy(model(*x), torch.tensor([0, 1, 2]))


def run(models: int, seed: int = 0) -> tuple[Counter[str], list[str]]:
    """Every edit on every layer of ``models`` random networks: outcome counts, failures."""
    counts: Counter[str] = Counter()
    failures = []
    for s in range(seed, seed + models):
        model, _ = random_model(s)
        for layer in layers_of(model):
            for edit in EDITS:
                outcome = run_case(s, layer, edit)
                counts[outcome.split(":")[0]] += 1
                if outcome.startswith("FAILED"):
                    failures.append(f"seed {s} {layer} {edit}: {outcome}")
    return counts, failures


def numerics(models: int, seed: int = 0) -> dict[str, list[float]]:
    """Max relative output error (max |after - before| / max |before|) of every committed
    function-preserving edit (``widen`` by splitting, ``deepen``), in float32 and float64."""
    errors: dict[str, list[float]] = {"float32": [], "float64": []}
    for s in range(seed, seed + models):
        for dtype, key in ((torch.float32, "float32"), (torch.float64, "float64")):
            model, _ = random_model(s)
            for layer in layers_of(model):
                for edit in ("widen", "deepen"):
                    m, xs = random_model(s)
                    m = m.to(dtype)
                    xs = tuple(t.to(dtype) if t.is_floating_point() else t for t in xs)
                    before = m(*xs).detach()
                    try:
                        if edit == "widen":
                            group = neuroexapt.trace(m, xs).group_of(layer)
                            if group.sums:
                                continue  # only approximately function-preserving
                            by = group.size if group.normalizers else \
                                2 * group.segments * group.atom
                            neuroexapt.widen(m, layer, by, example_inputs=xs)
                        else:
                            neuroexapt.deepen(m, layer, example_inputs=xs)
                    except NeuroExaptError:
                        continue
                    after = m(*xs).detach()
                    scale = before.abs().max().clamp(min=1e-30)
                    errors[key].append(float((after - before).abs().max() / scale))
    return errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--numerics", type=int, default=0,
                   help="also measure the output error of widen/deepen on this many models")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    counts, failures = run(args.models, args.seed)
    print(f"{args.models} models, {sum(counts.values())} cases: {dict(counts)} in "
          f"{time.perf_counter() - start:.0f} s")
    if args.numerics:
        for key, values in numerics(args.numerics, args.seed).items():
            values.sort()
            print(f"{key}: {len(values)} function-preserving edits, max relative error "
                  f"median {values[len(values) // 2]:.2e}, max {values[-1]:.2e}")
    for f in failures:
        print(f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
