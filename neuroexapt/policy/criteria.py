"""A small, safe expression language that selects units or layers by their metrics.

``ne.prune_layers(criteria="entropy<0.2")`` and friends take a criteria string such as
``"0.1 < entropy < 0.5 and not (importance >= 1e-3 or mi > 0.2)"``. The text is tokenised and
parsed by hand (never ``eval``): only metric names, numbers, the comparisons
``< <= > >= == !=`` (chains allowed), ``and``/``or``/``not`` and parentheses exist. Grammar::

    expr       := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | comparison | "(" expr ")"
    comparison := operand (OP operand)+
    operand    := metric name | number        (1, -0.5, .5, 5., 1e-3)

Keywords are case-insensitive, metric names are not. Syntax errors and unknown metric names
raise :class:`~neuroexapt.errors.ConfigError` with the text and a caret under the position.
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
import operator
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from neuroexapt.errors import ConfigError

__all__ = ["METRIC_ALIASES", "METRIC_NAMES", "Criteria"]

logger = logging.getLogger(__name__)

METRIC_NAMES = ("entropy", "mutual_information", "mi", "importance", "redundancy", "sensitivity",
                "gradient_variance", "rank_ratio", "dead_fraction", "information",
                "information_lost", "norm")
METRIC_ALIASES = {"mi": "mutual_information"}  # alias -> canonical name
MAX_DEPTH = 64  # deepest nesting of parentheses and ``not``; bounds the recursion

Value = float | torch.Tensor  # a metric: per-layer float or per-unit 1-D tensor
Truth = bool | torch.Tensor  # a selection: per-layer bool or per-unit BoolTensor

_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt,
    ">=": operator.ge, "==": operator.eq, "!=": operator.ne,
}
_KEYWORDS = ("and", "or", "not")
_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op><=|>=|==|!=|<|>)
  | (?P<paren>[()])
""", re.VERBOSE | re.ASCII)
_HINTS = {"=": "; use '==' to compare", "&": "; use 'and'", "|": "; use 'or'",
          "!": "; use 'not'", ".": "; metric names are plain identifiers"}


class _Token(NamedTuple):
    kind: str  # number, name, keyword, op, (, ), end
    text: str
    pos: int


def _fail(message: str, text: str, pos: int) -> ConfigError:
    """A ConfigError quoting ``text`` with a caret under ``pos``."""
    shown = "".join(" " if c.isspace() else c for c in text)  # keep the caret aligned
    return ConfigError(f"{message}\n  {shown}\n  {' ' * pos}^")


def _tokenize(text: str) -> list[_Token]:
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            char = text[pos]
            raise _fail(f"syntax error in criteria: unexpected character {char!r} at position "
                        f"{pos}{_HINTS.get(char, '')}", text, pos)
        kind = m.lastgroup or ""
        if kind == "number" and m.end() < len(text) and re.match(r"[\w.]", text[m.end()]):
            raise _fail(f"syntax error in criteria: malformed number at position {pos}", text, pos)
        if kind == "name" and m.group().lower() in _KEYWORDS:
            tokens.append(_Token("keyword", m.group().lower(), pos))
        elif kind != "space":
            tokens.append(_Token(m.group() if kind == "paren" else kind, m.group(), pos))
        pos = m.end()
    return [*tokens, _Token("end", "", len(text))]


def _is_nan_free(x: Value) -> Truth:
    return ~torch.isnan(x) if isinstance(x, torch.Tensor) else not math.isnan(x)


@dataclass(frozen=True)
class _Operand:
    text: str  # canonical metric name, or the normalised number
    value: float | None = None  # None for a metric

    def evaluate(self, env: Mapping[str, Value]) -> Value:
        return env[self.text] if self.value is None else self.value

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class _Compare:
    operands: tuple[_Operand, ...]
    ops: tuple[str, ...]  # one fewer than operands; a chain means "and"

    def evaluate(self, env: Mapping[str, Value]) -> Truth:
        values = [o.evaluate(env) for o in self.operands]
        result: Truth = True
        for op, a, b in zip(self.ops, values, values[1:], strict=False):
            result = result & _OPS[op](a, b) & _is_nan_free(a) & _is_nan_free(b)
        return result

    def __str__(self) -> str:
        pairs = zip(self.ops, self.operands[1:], strict=True)
        return " ".join([str(self.operands[0]), *(f"{op} {o}" for op, o in pairs)])


@dataclass(frozen=True)
class _Not:
    operand: _Node

    def evaluate(self, env: Mapping[str, Value]) -> Truth:
        inner = self.operand.evaluate(env)
        return ~inner if isinstance(inner, torch.Tensor) else not inner

    def __str__(self) -> str:
        inner = str(self.operand)
        return f"not ({inner})" if isinstance(self.operand, _BoolOp) else f"not {inner}"


@dataclass(frozen=True)
class _BoolOp:
    op: str  # "and" or "or"
    items: tuple[_Node, ...]  # flat: no item is a _BoolOp with the same op

    def evaluate(self, env: Mapping[str, Value]) -> Truth:
        combine = operator.and_ if self.op == "and" else operator.or_
        return functools.reduce(combine, (item.evaluate(env) for item in self.items))

    def __str__(self) -> str:
        wrap = self.op == "and"  # "or" binds looser, so an "or" inside an "and" needs parentheses
        return f" {self.op} ".join(
            f"({i})" if wrap and isinstance(i, _BoolOp) else str(i) for i in self.items
        )


_Node = _Compare | _Not | _BoolOp


class _Parser:
    """Recursive descent over the token list; unknown names are reported after the syntax."""

    def __init__(self, text: str, known: Collection[str]) -> None:
        self.text, self.known, self.tokens = text, known, _tokenize(text)
        self.i, self.depth, self.unknown, self.used = 0, 0, list[_Token](), set[str]()

    @property
    def tok(self) -> _Token:
        return self.tokens[self.i]

    def error(self, expected: str) -> ConfigError:
        found = "end of text" if self.tok.kind == "end" else repr(self.tok.text)
        message = f"expected {expected} at position {self.tok.pos}, found {found}"
        return _fail(f"syntax error in criteria: {message}", self.text, self.tok.pos)

    def parse(self) -> _Node:
        node = self.or_expr()
        if self.tok.kind != "end":
            raise self.error("'and', 'or' or end of text")
        return node

    def or_expr(self) -> _Node:
        return self.bool_op("or", self.and_expr)

    def and_expr(self) -> _Node:
        return self.bool_op("and", self.not_expr)

    def bool_op(self, op: str, sub: Callable[[], _Node]) -> _Node:
        items = [sub()]
        while self.tok.kind == "keyword" and self.tok.text == op:
            self.i += 1
            items.append(sub())
        if len(items) == 1:
            return items[0]
        same = [i.items if isinstance(i, _BoolOp) and i.op == op else (i,) for i in items]
        return _BoolOp(op, tuple(x for group in same for x in group))

    def not_expr(self) -> _Node:
        start = self.tok
        if start.kind != "(" and (start.kind, start.text) != ("keyword", "not"):
            return self.comparison()
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _fail(f"criteria nest deeper than {MAX_DEPTH} at position {start.pos}",
                        self.text, start.pos)
        self.i += 1
        if start.kind == "keyword":
            node: _Node = _Not(self.not_expr())
        else:
            node = self.or_expr()
            if self.tok.kind != ")":
                raise self.error("'and', 'or' or ')'")
            self.i += 1
        self.depth -= 1
        return node

    def comparison(self) -> _Compare:
        operands, ops = [self.operand()], []
        while self.tok.kind == "op":
            ops.append(self.tok.text)
            self.i += 1
            operands.append(self.operand())
        if not ops:
            raise self.error("a comparison operator (<, <=, >, >=, ==, !=)")
        return _Compare(tuple(operands), tuple(ops))

    def operand(self) -> _Operand:
        tok = self.tok
        if tok.kind not in ("number", "name"):
            raise self.error("a number or a metric name")
        self.i += 1
        if tok.kind == "number":
            text = repr(float(tok.text))
            return _Operand(text.removesuffix(".0"), float(tok.text))
        if tok.text not in self.known:
            self.unknown.append(tok)
        alias = METRIC_ALIASES.get(tok.text)
        name = alias if alias in self.known else tok.text
        self.used.add(name)
        return _Operand(name)


class Criteria:
    """A parsed criteria expression that selects units (per-unit metrics) or layers.

    Example::

        >>> c = Criteria.parse("entropy < 0.2 and importance < 1e-3")
        >>> sorted(c.names)
        ['entropy', 'importance']
        >>> c.select({"entropy": torch.tensor([0.1, 0.5, 0.0]), "importance": 0.0})
        [0, 2]

    Args:
        text: the expression, e.g. ``"0.1 < entropy < 0.5 or not redundancy <= 0.9"``.
        names: the metric names that exist (default :data:`METRIC_NAMES`); ``"mi"`` is an
            alias of ``"mutual_information"`` wherever both are known.
    """

    def __init__(self, text: str, names: Collection[str] | None = None) -> None:
        if not isinstance(text, str):
            raise ConfigError(f"criteria must be a string such as 'entropy<0.2', got {text!r}")
        if isinstance(names, str):
            raise ConfigError(f"names must be a collection of metric names, got the string "
                              f"{names!r}; wrap it in a tuple")
        if not text.strip():
            raise ConfigError("criteria is empty; write a comparison such as 'entropy<0.2'")
        known = tuple(METRIC_NAMES if names is None else names)
        parser = _Parser(text, known)
        self.text = text
        self._root = parser.parse()
        if parser.unknown:
            tok = parser.unknown[0]
            close = difflib.get_close_matches(tok.text, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise _fail(f"unknown metric {tok.text!r} at position {tok.pos} in criteria; "
                        f"known: {', '.join(known)}{hint}", text, tok.pos)
        self.names: frozenset[str] = frozenset(parser.used)  # canonical metric names used

    @classmethod
    def parse(cls, text: str, names: Collection[str] | None = None) -> Criteria:
        """Parse ``text``; raise ConfigError at the first syntax error or unknown name."""
        return cls(text, names)

    def __str__(self) -> str:
        """The normalised form: lower-case keywords, canonical names, minimal parentheses."""
        return str(self._root)

    def __repr__(self) -> str:
        return f"Criteria({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Criteria) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def evaluate(self, values: Mapping[str, Any]) -> Truth:
        """Evaluate on metric values: floats (per layer) or 1-D tensors (per unit).

        Floats broadcast against tensors. The result is a ``bool`` when every metric used is a
        float, else a BoolTensor ``[units]``. A comparison with a NaN operand is False, ``!=``
        included (unlike IEEE), so an unmeasured unit is never selected by a comparison;
        ``not`` still inverts that False. Numbers meet a tensor in its dtype (torch's rule).
        """
        env = {name: self._value(name, values) for name in self.names}
        lengths = {n: len(v) for n, v in env.items() if isinstance(v, torch.Tensor)}
        if len(set(lengths.values())) > 1:
            got = ", ".join(f"{n}: {k}" for n, k in sorted(lengths.items()))
            raise ConfigError(f"per-unit metrics must have the same length; got {got}")
        return self._root.evaluate(env)

    def select(self, values: Mapping[str, Any]) -> list[int]:
        """Indices of the units where the criteria hold; needs a per-unit metric."""
        result = self.evaluate(values)
        if not isinstance(result, torch.Tensor):
            raise ConfigError(f"criteria '{self}' uses only per-layer values, so there are no "
                              "units to select; pass 1-D tensors or use evaluate()")
        return torch.nonzero(result).flatten().tolist()

    def _value(self, name: str, values: Mapping[str, Any]) -> Value:
        keys = [name, *(a for a, target in METRIC_ALIASES.items() if target == name)]
        key = next((k for k in keys if k in values), None)
        if key is None:
            provided = ", ".join(sorted(map(str, values))) or "none"
            raise ConfigError(f"criteria '{self}' uses metric '{name}' but no value was given "
                              f"for it; provided: {provided}")
        raw = values[key]
        if isinstance(raw, torch.Tensor):
            if raw.ndim > 1:
                raise ConfigError(f"metric '{key}' must be a float or a 1-D tensor of per-unit "
                                  f"values, got a tensor of shape {tuple(raw.shape)}")
            return raw if raw.ndim == 1 else float(raw)
        try:
            return float(raw)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"metric '{key}' must be a float or a 1-D tensor, got {raw!r}") from e
