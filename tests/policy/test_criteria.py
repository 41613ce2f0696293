"""Criteria: the safe expression language that selects units or layers by their metrics."""

from __future__ import annotations

import builtins
import itertools
import math
import re
from collections.abc import Callable

import pytest
import torch

from neuroexapt.errors import ConfigError
from neuroexapt.policy.criteria import MAX_DEPTH, METRIC_NAMES, Criteria

ABC = ("a", "b", "c")
NAN = float("nan")


def parse(text: str) -> Criteria:
    return Criteria.parse(text, names=ABC)


def assert_caret(error: pytest.ExceptionInfo[ConfigError], text: str, pos: int) -> None:
    """The message ends with the text (whitespace shown as spaces) and a caret under ``pos``."""
    *_, shown, caret = str(error.value).split("\n")
    assert shown == "  " + re.sub(r"\s", " ", text)
    assert caret == "  " + " " * pos + "^"


# (expression over a<1, b<1, c<1, the same over Python booleans A, B, C)
TRUTH_TABLES: list[tuple[str, Callable[[bool, bool, bool], bool]]] = [
    ("a<1 and b<1", lambda a, b, c: a and b),
    ("a<1 or b<1", lambda a, b, c: a or b),
    ("not a<1", lambda a, b, c: not a),
    ("a<1 or b<1 and c<1", lambda a, b, c: a or (b and c)),  # and binds tighter than or
    ("a<1 and b<1 or c<1", lambda a, b, c: (a and b) or c),
    ("(a<1 or b<1) and c<1", lambda a, b, c: (a or b) and c),
    ("not a<1 and b<1", lambda a, b, c: (not a) and b),  # not binds tighter than and
    ("not (a<1 and b<1)", lambda a, b, c: not (a and b)),
    ("not not a<1 or not (b<1 or c<1)", lambda a, b, c: a or not (b or c)),
    ("((a<1)) and (b<1 or (c<1))", lambda a, b, c: a and (b or c)),
]
COMBOS = list(itertools.product([True, False], repeat=3))


def as_values(a: bool, b: bool, c: bool) -> dict[str, float]:
    return {"a": 0.0 if a else 2.0, "b": 0.0 if b else 2.0, "c": 0.0 if c else 2.0}


@pytest.mark.parametrize(("text", "truth"), TRUTH_TABLES)
def test_truth_tables_per_layer(text: str, truth: Callable[[bool, bool, bool], bool]) -> None:
    criteria = parse(text)
    for combo in COMBOS:
        result = criteria.evaluate(as_values(*combo))
        assert isinstance(result, bool)
        assert result == truth(*combo), combo


@pytest.mark.parametrize(("text", "truth"), TRUTH_TABLES)
def test_truth_tables_per_unit(text: str, truth: Callable[[bool, bool, bool], bool]) -> None:
    # One unit per combination: the tensor path agrees with the scalar path.
    values = {k: torch.tensor([as_values(*combo)[k] for combo in COMBOS]) for k in ABC}
    result = parse(text).evaluate(values)
    assert isinstance(result, torch.Tensor) and result.dtype == torch.bool
    assert result.tolist() == [truth(*combo) for combo in COMBOS]


def test_precedence_in_the_parsed_form() -> None:
    assert parse("a<1 or b<1 and c<1") == parse("a<1 or (b<1 and c<1)")
    assert parse("a<1 or b<1 and c<1") != parse("(a<1 or b<1) and c<1")
    assert str(parse("(a<1 or b<1) and c<1")) == "(a < 1 or b < 1) and c < 1"
    assert str(parse("a<1 or (b<1 and c<1)")) == "a < 1 or b < 1 and c < 1"
    assert str(parse("not (a<1 or b<1)")) == "not (a < 1 or b < 1)"
    assert str(parse("(a<1 and b<1) and (c<1)")) == "a < 1 and b < 1 and c < 1"  # flattened


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.1 < a < 0.5", [False, False, True, False, False]),
        ("0.1 <= a <= 0.5", [False, True, True, True, False]),
        ("0.5 > a >= 0.1", [False, True, True, False, False]),
        ("0 < a != 0.3", [True, True, False, True, True]),
        ("0 < a < 1 == 2", [False, False, False, False, False]),  # 1 == 2 fails every unit
        ("a < 0.5 < 0.6", [True, True, True, False, False]),
        ("a < 0.5 > 0.6", [False, False, False, False, False]),  # 0.5 > 0.6 is False
    ],
)
def test_chained_comparisons(text: str, expected: list[bool]) -> None:
    points = [0.05, 0.1, 0.3, 0.5, 0.7]
    assert parse(text).evaluate({"a": torch.tensor(points)}).tolist() == expected
    assert [parse(text).evaluate({"a": v}) for v in points] == expected


@pytest.mark.parametrize(
    ("op", "expected"),
    [("<", [True, False, False]), ("<=", [True, True, False]), (">", [False, False, True]),
     (">=", [False, True, True]), ("==", [False, True, False]), ("!=", [True, False, True])],
)
def test_each_operator(op: str, expected: list[bool]) -> None:
    criteria = parse(f"a {op} 1")
    assert criteria.evaluate({"a": torch.tensor([0, 1, 2])}).tolist() == expected
    assert criteria.select({"a": torch.tensor([0.0, 1.0, 2.0])}) == [
        i for i, e in enumerate(expected) if e
    ]


@pytest.mark.parametrize(
    ("number", "value", "normalised"),
    [("1e-3", 1e-3, "0.001"), ("-0.5", -0.5, "-0.5"), (".5", 0.5, "0.5"), ("5.", 5.0, "5"),
     ("+2", 2.0, "2"), ("1E3", 1000.0, "1000"), ("2.5e+2", 250.0, "250"), ("-.25", -0.25, "-0.25"),
     ("0", 0.0, "0"), ("42", 42.0, "42"), ("3e-08", 3e-8, "3e-08")],
)
def test_numbers_in_all_forms(number: str, value: float, normalised: str) -> None:
    criteria = parse(f"a=={number}")
    assert str(criteria) == f"a == {normalised}"
    assert criteria.evaluate({"a": value}) is True
    assert criteria.evaluate({"a": value + 1.0}) is False
    assert parse(f"{number} == a") == parse(f"{normalised} == a")


def test_negative_number_right_after_an_operator() -> None:
    assert parse("a<-1").evaluate({"a": -2.0}) is True
    assert parse("a<-1").evaluate({"a": 0.0}) is False


@pytest.mark.parametrize(
    "text", ["a<1 AND b<1", "a<1 And b<1", "a<1 aNd b<1", "  a <\t1\n and b<1 ", "(a<1)and(b<1)"]
)
def test_keywords_case_insensitive_and_whitespace_insensitive(text: str) -> None:
    assert str(parse(text)) == "a < 1 and b < 1"
    assert parse(text).evaluate({"a": 0.0, "b": 0.0}) is True


def test_or_and_not_keywords_case_insensitive() -> None:
    assert str(parse("NOT a<1 Or b<1")) == "not a < 1 or b < 1"
    assert parse("NoT a<1").evaluate({"a": 2.0}) is True


def test_metric_names_are_case_sensitive() -> None:
    with pytest.raises(ConfigError, match=r"unknown metric 'Entropy'.*did you mean 'entropy'\?"):
        Criteria.parse("Entropy < 0.2")


def test_per_unit_tensors_broadcast_with_per_layer_floats() -> None:
    criteria = Criteria.parse("entropy < 0.2 and importance < 1e-3")
    values = {"entropy": torch.tensor([0.1, 0.5, 0.0, 0.19]), "importance": 0.0}
    result = criteria.evaluate(values)
    assert isinstance(result, torch.Tensor) and result.dtype == torch.bool
    assert result.shape == (4,)
    assert result.tolist() == [True, False, True, True]
    assert criteria.select(values) == [0, 2, 3]
    assert criteria.select({**values, "importance": 1.0}) == []  # the layer fails: no unit


def test_per_layer_input_gives_a_bool_and_cannot_select() -> None:
    criteria = Criteria.parse("entropy < 0.2 or norm > 3")
    assert criteria.evaluate({"entropy": 0.5, "norm": 4}) is True
    assert criteria.evaluate({"entropy": torch.tensor(0.5), "norm": 1.0}) is False  # 0-d tensor
    with pytest.raises(ConfigError, match="only per-layer values, so there are no units"):
        criteria.select({"entropy": 0.1, "norm": 1.0})


def test_a_constant_comparison_broadcasts_against_units() -> None:
    assert parse("1 < 2 or a < 0").evaluate({"a": torch.tensor([1.0, 2.0])}).tolist() == [True] * 2
    assert parse("1 > 2 or a < 0").select({"a": torch.tensor([1.0, -2.0])}) == [1]


def test_per_unit_lengths_must_agree() -> None:
    values = {"a": torch.zeros(3), "b": torch.zeros(2)}
    with pytest.raises(ConfigError, match="same length; got a: 3, b: 2"):
        parse("a < 1 and b < 1").evaluate(values)


@pytest.mark.parametrize(
    ("value", "match"),
    [(torch.zeros(2, 3), r"metric 'a' must be a float or a 1-D tensor .*shape \(2, 3\)"),
     ("high", "metric 'a' must be a float or a 1-D tensor, got 'high'"),
     (None, "metric 'a' must be a float or a 1-D tensor, got None")],
)
def test_bad_metric_values(value: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse("a < 1").evaluate({"a": value})


@pytest.mark.parametrize(
    ("text", "expected"),
    [("a < 0.5", [False, True, False]), ("a >= 0.5", [False, False, True]),
     ("a != 0.1", [False, False, True]),  # NaN != x is False here, unlike IEEE
     ("a == a", [False, True, True]), ("not a < 0.5", [True, False, True]),
     ("a < 0.5 or a >= 0.5", [False, True, True])],
)
def test_nan_compares_false(text: str, expected: list[bool]) -> None:
    assert parse(text).evaluate({"a": torch.tensor([NAN, 0.1, 0.9])}).tolist() == expected
    scalar = [parse(text).evaluate({"a": v}) for v in (NAN, 0.1, 0.9)]
    assert scalar == expected


@pytest.mark.parametrize("op", ["<", "<=", ">", ">=", "==", "!="])
def test_nan_per_layer_is_false_for_every_operator(op: str) -> None:
    assert parse(f"a {op} 1").evaluate({"a": math.nan}) is False
    assert parse(f"1 {op} a").evaluate({"a": math.nan}) is False


@pytest.mark.parametrize(
    ("text", "match", "pos"),
    [("entropy<", "expected a number or a metric name at position 8, found end of text", 8),
     ("entropy", r"expected a comparison operator \(<, <=, >, >=, ==, !=\) at position 7", 7),
     ("(entropy<1", "expected 'and', 'or' or '\\)' at position 10, found end of text", 10),
     ("entropy<1)", "expected 'and', 'or' or end of text at position 9, found '\\)'", 9),
     ("entropy<1 and", "expected a number or a metric name at position 13", 13),
     ("< 1", "expected a number or a metric name at position 0, found '<'", 0),
     ("entropy<<1", "expected a number or a metric name at position 8, found '<'", 8),
     ("and entropy<1", "expected a number or a metric name at position 0, found 'and'", 0),
     ("not", "expected a number or a metric name at position 3, found end of text", 3),
     ("()", "expected a number or a metric name at position 1, found '\\)'", 1),
     ("(entropy)<1", "expected a comparison operator .* at position 8, found '\\)'", 8),
     ("entropy = 1", "unexpected character '=' at position 8; use '==' to compare", 8),
     ("entropy<0.2 && mi<1", "unexpected character '&' at position 12; use 'and'", 12),
     ("entropy<0.2 || mi<1", "unexpected character '\\|' at position 12; use 'or'", 12),
     ("!entropy<1", "unexpected character '!' at position 0; use 'not'", 0),
     ("entropy<1e", "malformed number at position 8", 8),
     ("entropy<1.2.3", "malformed number at position 8", 8),
     ("entropy<0.2and mi<1", "malformed number at position 8", 8),
     ("entropy < 1\nand\t", "expected a number or a metric name at position 16", 16),
     ("entropy<１", "unexpected character '１' at position 8", 8)],  # full-width digit
)
def test_syntax_errors_point_at_the_position(text: str, match: str, pos: int) -> None:
    with pytest.raises(ConfigError, match=f"^syntax error in criteria: {match}") as error:
        Criteria.parse(text)
    assert_caret(error, text, pos)


@pytest.mark.parametrize(
    ("text", "pos"),
    [("__import__('os')", 11), ('__import__("os").system("ls")', 11),
     ("entropy<0.2; import os", 11), ("entropy<0.2 import os", 12),
     ("entropy.__class__ < 1", 7), ("entropy<0.2 or os.system('x')<1", 17),
     ("lambda: 1", 6), ("[x for x in ()]", 0), ("entropy<1 if 1 else 0", 10),
     ("entropy<0.2 or entropy[0]<1", 22), ("entropy<{}", 8), ("`entropy`<1", 0)],
)
def test_injection_attempts_are_syntax_errors(text: str, pos: int) -> None:
    with pytest.raises(ConfigError, match=r"^syntax error in criteria") as error:
        Criteria.parse(text)
    assert_caret(error, text, pos)


def test_attribute_access_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"'\.' at position 1; metric names are plain"):
        parse("a.b < 1")


def test_no_eval_or_exec(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("eval/exec must not be used")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    criteria = Criteria.parse("0.1 < entropy < 0.5 and not (mi > 0.2 or norm >= 1e3)")
    assert criteria.evaluate({"entropy": 0.3, "mi": 0.1, "norm": 5.0}) is True


def test_unknown_metric_with_suggestion_and_caret() -> None:
    expected = (
        "unknown metric 'entropi' at position 0 in criteria; known: "
        + ", ".join(METRIC_NAMES)
        + "; did you mean 'entropy'?"
    )
    with pytest.raises(ConfigError, match=f"^{re.escape(expected)}\n") as error:
        Criteria.parse("entropi<0.2")
    assert_caret(error, "entropi<0.2", 0)


def test_first_unknown_metric_is_reported_at_its_position() -> None:
    text = "entropy<1 and impotance<1 or sensitivty>2"
    with pytest.raises(ConfigError, match=r"'impotance' at position 14.*'importance'") as error:
        Criteria.parse(text)
    assert_caret(error, text, 14)


def test_unknown_metric_without_a_close_match() -> None:
    with pytest.raises(ConfigError, match=r"unknown metric 'xyzzy' .*known: entropy, ") as error:
        Criteria.parse("xyzzy < 1")
    assert "did you mean" not in str(error.value)


def test_custom_names() -> None:
    assert Criteria.parse("loss < 2", names=["loss", "acc"]).names == frozenset({"loss"})
    with pytest.raises(ConfigError, match="known: loss, acc; did you mean 'loss'"):
        Criteria.parse("los < 2", names=["loss", "acc"])
    with pytest.raises(ConfigError, match="unknown metric 'entropy'"):
        Criteria.parse("entropy < 2", names=["loss"])


def test_syntax_errors_are_reported_before_unknown_names() -> None:
    with pytest.raises(ConfigError, match=r"^syntax error in criteria: expected a number"):
        Criteria.parse("entropi <")


def test_names_are_the_canonical_metrics_used() -> None:
    criteria = Criteria.parse("entropy < 0.2 and (mi > 0.1 or entropy > 0.9)")
    assert criteria.names == frozenset({"entropy", "mutual_information"})
    assert str(criteria) == "entropy < 0.2 and (mutual_information > 0.1 or entropy > 0.9)"
    assert Criteria.parse("1 < 2").names == frozenset()


@pytest.mark.parametrize("key", ["mi", "mutual_information"])
def test_alias_reads_either_key(key: str) -> None:
    for text in ("mi < 0.1", "mutual_information < 0.1"):
        assert Criteria.parse(text).evaluate({key: 0.05}) is True
        assert Criteria.parse(text).evaluate({key: 0.5}) is False


def test_alias_only_applies_when_its_target_is_known() -> None:
    assert Criteria.parse("mi < 1", names=["mi"]).names == frozenset({"mi"})


def test_missing_value_names_the_metric_and_lists_the_provided_ones() -> None:
    criteria = Criteria.parse("entropy < 1 and importance < 1")
    with pytest.raises(ConfigError, match=r"uses metric 'importance' .*provided: entropy, norm$"):
        criteria.evaluate({"norm": 2.0, "entropy": 0.1})
    with pytest.raises(ConfigError, match=r"provided: none$"):
        criteria.select({})


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text(text: str) -> None:
    with pytest.raises(ConfigError, match="criteria is empty; write a comparison such as"):
        Criteria.parse(text)


def test_non_string_arguments() -> None:
    with pytest.raises(ConfigError, match="criteria must be a string"):
        Criteria.parse(0.2)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="got the string 'entropy'; wrap it in a tuple"):
        Criteria.parse("entropy < 1", names="entropy")


def test_nesting_depth_is_bounded() -> None:
    ok = "(" * MAX_DEPTH + "a<1" + ")" * MAX_DEPTH
    assert parse(ok).evaluate({"a": 0.0}) is True
    assert parse("not " * MAX_DEPTH + "a<1").evaluate({"a": 0.0}) is True  # even count
    too_deep = "(" * (MAX_DEPTH + 1) + "a<1" + ")" * (MAX_DEPTH + 1)
    with pytest.raises(ConfigError, match=f"nest deeper than {MAX_DEPTH} at position {MAX_DEPTH}"):
        parse(too_deep)


def test_long_flat_expressions_do_not_recurse() -> None:
    criteria = parse(" or ".join(["a < 1"] * 2000))
    assert criteria.evaluate({"a": 0.0}) is True
    assert criteria.evaluate({"a": 5.0}) is False


@pytest.mark.parametrize(
    "text",
    ["0.1<entropy<0.5 AND NOT(importance>=1e-3 or mi>.2)", "not not norm != -1.5e-7",
     "(redundancy>0.9 or dead_fraction>0.5) and rank_ratio<0.25", "information_lost==+3"],
)
def test_str_round_trips(text: str) -> None:
    criteria = Criteria.parse(text)
    again = Criteria.parse(str(criteria))
    assert again == criteria and str(again) == str(criteria)
    assert hash(again) == hash(criteria)
    assert repr(criteria) == f"Criteria({str(criteria)!r})"


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown metric"):
        Criteria.parse("nope < 1")
