"""The workflow expression language and ${…} templates (spec §2.4), pure."""

from __future__ import annotations

import random
import sys

import pytest

from cordum.workflow.expr import (
    FORBIDDEN_WORDS,
    MAX_DEPTH,
    MAX_EXPRESSION_LENGTH,
    MAX_INT,
    MAX_STRING_LENGTH,
    Expr,
    ExprError,
    evaluate,
    parse,
    render,
    template_problems,
    _parse_cached,
    truthy,
)

SCOPE = {
    "input": {"name": "bob", "count": 3, "tags": ["a", "b"], "flag": True, "empty": ""},
    "ctx": {"limits": {"max": 10}},
    "steps": {
        "fetch": {"output": {"items": [{"id": 1, "v": "x"}, {"id": 2, "v": "y"}], "n": 5}},
        "fetch-data": {"output": {"ok": True}},
    },
    "item": {"price": 2.5},
    "loop": {"index": 0},
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # literals
        ("1", 1),
        ("1.5", 1.5),
        ("2e3", 2000.0),
        (".5", 0.5),
        ("'single'", "single"),
        ('"double"', "double"),
        (r'"a\"b\n\t\\c"', 'a"b\n\t\\c'),
        (r"'it\'s'", "it's"),
        (r'"\u00e9"', "é"),
        ("true", True),
        ("false", False),
        ("null", None),
        ("nil", None),
        ("[1, 'a', null]", [1, "a", None]),
        ("[]", []),
        # precedence and associativity
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("10 - 4 - 3", 3),
        ("2 * 3 % 4", 2),
        ("-2 * 3", -6),
        ("- (2 + 3)", -5),
        ("1 + 2 == 3", True),
        ("1 < 2 == true", True),
        ("true || false && false", True),
        ("(true || false) && false", False),
        ("!true || true", True),
        ("!(true || true)", False),
        ("1 == 1 ? 'y' : 'n'", "y"),
        ("false ? 1 : true ? 2 : 3", 2),
        ("1 + 1 > 1 ? 'big' : 'small'", "big"),
        ("null ?? 'd'", "d"),
        ("0 ?? 'd'", 0),
        ("missing ?? input.name", "bob"),
        # arithmetic
        ("7 / 2", 3.5),
        ("6 / 3", 2.0),
        ("7 % 3", 1),
        ("-7 % 3", 2),
        ("1.5 + 1", 2.5),
        ("'a' + 'b'", "ab"),
        ("input.count * 2", 6),
        ("item.price * 2", 5.0),
        # comparisons
        ("1 == 1.0", True),
        ("1 != 2", True),
        ("'a' == 'a'", True),
        ("'a' != 'a'", False),
        ("true == 1", False),
        ("null == null", True),
        ("missing == null", True),
        ("1 == '1'", False),
        ("[1, 2] == [1, 2]", True),
        ("2 < 3", True),
        ("3 <= 3", True),
        ("4 > 3.5", True),
        ("3 >= 4", False),
        ("'abc' < 'abd'", True),
        # in / not in / contains
        ("'a' in input.tags", True),
        ("'z' in input.tags", False),
        ("'name' in input", True),
        ("'bo' in input.name", True),
        ("1 in missing", False),
        ("'z' not in input.tags", True),
        ("not ('a' in input.tags)", False),
        ("'a' not in input.tags", False),
        ("not 'x' == 'y'", False),  # unary operators bind tighter than every binary one: (not 'x') == 'y'
        ("!missing == true", True),
        ("contains(input.tags, 'b')", True),
        ("contains(input.name, 'ob')", True),
        ("contains(input, 'count')", True),
        ("contains(missing, 'x')", False),
        ("startsWith(input.name, 'b')", True),
        ("startsWith(input.name, 'o')", False),
        ("endsWith(input.name, 'ob')", True),
        ("endsWith(missing, 'x')", False),
        # logical operators and keywords
        ("true && true", True),
        ("true and false", False),
        ("false or true", True),
        ("not input.flag", False),
        ("!input.empty", True),
        ("input.name && input.count", True),
        # functions
        ("length(input.tags)", 2),
        ("length(input)", 5),
        ("length(input.name)", 3),
        ("length(missing)", 0),
        ("length(42)", 0),
        ("first(input.tags)", "a"),
        ("first([])", None),
        ("first(missing)", None),
        ("first(steps.fetch.output.items).id", 1),
        # paths and indexing
        ("steps.fetch.output.n", 5),
        ("steps.fetch.output.items[1].v", "y"),
        ("steps.fetch.output.items[-1].id", 2),
        ("steps.fetch.output.items[2]", None),
        ("steps.fetch.output.items[-3]", None),
        ("steps['fetch-data'].output.ok", True),
        ('steps["fetch"]["output"]["n"]', 5),
        ("input.tags[loop.index]", "a"),
        ("input.name[0]", "b"),
        ("input.tags['x']", None),
        ("ctx.limits.max - input.count", 7),
        # missing names and paths are None, never errors
        ("missing", None),
        ("missing.deep.path[3].x", None),
        ("input.count.x", None),
        ("input.tags.length", None),
        ("steps.nope.output", None),
    ],
)
def test_evaluate_table(text: str, expected: object) -> None:
    result = evaluate(text, SCOPE)
    assert result == expected
    assert type(result) is type(expected)


def test_paths_never_use_attributes() -> None:
    class Obj:
        secret = "s"

    assert evaluate("o.secret", {"o": Obj()}) is None
    assert evaluate("s.upper", {"s": "abc"}) is None
    assert evaluate("d.keys", {"d": {"a": 1}}) is None


def test_short_circuit_skips_the_failing_side() -> None:
    assert evaluate("false && 1 / 0", {}) is False
    assert evaluate("true || 1 / 0", {}) is True
    assert evaluate("true ? 1 : 1 / 0", {}) == 1
    assert evaluate("false ? 1 / 0 : 2", {}) == 2
    assert evaluate("1 ?? 1 / 0", {}) == 1
    with pytest.raises(ExprError):
        evaluate("true && 1 / 0", {})
    with pytest.raises(ExprError):
        evaluate("false || 1 / 0", {})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, False), (False, False), ("", False), (0, False), (0.0, False),
        (True, True), ("x", True), (1, True), (-0.5, True), ("0", True), ("false", True),
        # the spec's rule (Go isTruthy): collections are true, even when empty
        ([], True), ({}, True), ([0], True),
    ],
)
def test_truthy(value: object, expected: bool) -> None:
    assert truthy(value) is expected
    assert evaluate("!!v", {"v": value}) is expected


@pytest.mark.parametrize(
    ("text", "position", "fragment"),
    [
        ("a >", 3, "expected a value"),
        ("", 0, "empty expression"),
        ("1 +", 3, "expected a value"),
        ("(1 + 2", 6, "expected ')'"),
        ("1 2", 2, "unexpected number"),
        ("a.", 2, "expected a name after '.'"),
        ("a[1", 3, "expected ']'"),
        ("'abc", 0, "unterminated string"),
        (r"'\q'", 1, "unknown escape"),
        ("a # b", 2, "unexpected character '#'"),
        ("a = 1", 2, "unexpected character '='"),
        ("true ? 1", 8, "expected ':'"),
        ("foo(1)", 0, "unknown function 'foo'"),
        ("length(1, 2)", 0, "takes 1 argument"),
        ("contains(1)", 0, "takes 2 argument"),
        ("in", 0, "expected a value"),
        ("_private", 0, "names starting with '_'"),
        ("a._b", 2, "names starting with '_'"),
        ("12abc", 2, "in a number"),
    ],
)
def test_syntax_errors_name_expression_and_position(text: str, position: int, fragment: str) -> None:
    with pytest.raises(ExprError) as info:
        parse(text)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.expression == text
    assert err.position == position
    assert fragment in str(err)
    assert str(err).startswith("expression ")
    assert f"at position {position}" in str(err)


def test_error_message_format() -> None:
    with pytest.raises(ExprError) as info:
        parse("a >")
    assert str(info.value) == 'expression "a >": expected a value at position 3'


@pytest.mark.parametrize(
    ("text", "position", "fragment"),
    [
        ("1 / 0", 2, "division by zero"),
        ("1 % 0", 2, "division by zero"),
        ("1.0 / 0.0", 4, "division by zero"),
        ("'a' < 1", 4, "cannot compare string < int"),
        ("missing > 3", 8, "cannot compare null > int"),
        ("[1] < [2]", 4, "cannot compare list < list"),
        ("'a' + 1", 4, "cannot apply '+' to string and int"),
        ("'a' * 3", 4, "cannot apply '*'"),
        ("[1] * 3", 4, "cannot apply '*'"),
        ("[1] + [2]", 4, "cannot apply '+'"),
        ("true + 1", 5, "cannot apply '+' to bool and int"),
        ("-'a'", 0, "cannot negate string"),
        ("1 in 5", 2, "'in' needs a list, map or string"),
        ("1 in 'abc'", 2, "'in' needs a string on the left"),
        ("9223372036854775807 + 1", 20, "integer overflow"),
        ("-9223372036854775807 - 2", 21, "integer overflow"),
        ("big * big", 4, "integer overflow"),
        ("1e308 * 10", 6, "numeric overflow"),
        ("1e308 + 1e308", 6, "numeric overflow"),
    ],
)
def test_type_errors_are_expr_errors(text: str, position: int, fragment: str) -> None:
    expr = parse(text)
    with pytest.raises(ExprError) as info:
        expr.evaluate({**SCOPE, "big": 1 << 40})
    assert info.value.expression == text
    assert info.value.position == position
    assert fragment in str(info.value)


def test_parse_is_cached_and_reusable() -> None:
    a = parse("input.count + 1")
    assert parse("input.count + 1") is a
    assert isinstance(a, Expr)
    assert a.evaluate({"input": {"count": 1}}) == 2
    with pytest.raises(ExprError):
        a.evaluate({})
    with pytest.raises(AttributeError):
        a.text = "x"  # type: ignore[misc]


def test_parse_rejects_non_strings() -> None:
    with pytest.raises(ExprError):
        parse(3)  # type: ignore[arg-type]


def test_length_limit() -> None:
    ok = "1" + " " * (MAX_EXPRESSION_LENGTH - 1)
    assert evaluate(ok, {}) == 1
    with pytest.raises(ExprError) as info:
        parse(ok + " ")
    assert info.value.position == MAX_EXPRESSION_LENGTH
    assert "longer than 4096" in str(info.value)
    assert MAX_EXPRESSION_LENGTH == 4096


@pytest.mark.parametrize("word", FORBIDDEN_WORDS)
def test_forbidden_words(word: str) -> None:
    for text in (f"a.{word}", f"'{word.upper()}'", f"x == 1 && {word}"):
        with pytest.raises(ExprError) as info:
            parse(text)
        assert "forbidden word" in str(info.value)
        assert info.value.position == text.lower().find(word)


def test_forbidden_words_match_substrings_like_the_go_sandbox() -> None:
    with pytest.raises(ExprError):
        parse("steps.executor.output")
    assert evaluate('steps["ex" + "ecutor"]', {"steps": {"executor": 1}}) == 1


def test_depth_limit_parentheses_unary_and_chains() -> None:
    ok = "(" * (MAX_DEPTH - 1) + "1" + ")" * (MAX_DEPTH - 1)
    assert evaluate(ok, {}) == 1
    for text in (
        "(" * 1000 + "1" + ")" * 1000,
        "!" * 2000 + "true",
        "-" * 2000 + "1",
        "a" + "[0]" * 200,
        "+".join(["1"] * 200),
        "a" + ".b" * 100,
        "[" * 500 + "]" * 500,
        "f(" * 300,
    ):
        with pytest.raises(ExprError) as info:
            parse(text)
        assert "nested deeper" in str(info.value) or "unknown function" in str(info.value)


def test_integer_range_is_64_bit() -> None:
    assert evaluate("9223372036854775806 + 1", {}) == MAX_INT
    assert evaluate("-9223372036854775807 - 1", {}) == -MAX_INT - 1
    assert evaluate("big > 1", {"big": 10**30}) is True  # large inputs compare; only results are capped


def _stack_depth() -> int:
    depth, frame = 0, sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    return depth


@pytest.mark.parametrize(
    "text",
    [
        "(" * (MAX_DEPTH - 1) + "1" + ")" * (MAX_DEPTH - 1),
        "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1),
        "length(" * (MAX_DEPTH - 1) + "1" + ")" * (MAX_DEPTH - 1),
        "-(" * 31 + "1" + ")" * 31,
        "a" + "[a" * 31 + "]" * 31,
        "!" * (MAX_DEPTH - 2) + "true",
    ],
)
def test_deepest_accepted_expressions_fit_in_500_frames(text: str) -> None:
    """The depth limit keeps parse + evaluate far from Python's default limit of 1000 frames."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(_stack_depth() + 500)
    try:
        _parse_cached.cache_clear()  # parse for real, not from the cache
        parse(text).evaluate({"a": [0]})
    finally:
        sys.setrecursionlimit(limit)


def test_string_results_are_capped() -> None:
    half = "x" * (MAX_STRING_LENGTH // 2 + 1)
    with pytest.raises(ExprError) as info:
        evaluate("a + a", {"a": half})
    assert "longer than" in str(info.value)
    with pytest.raises(ExprError):
        render("${a}${a}", {"a": half})


# ---------------------------------------------------------------------------------------------
# templates


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain text", "plain text"),
        ("", ""),
        ("$ and { and } and $x", "$ and { and } and $x"),
        ("${input.count}", 3),
        ("${input.tags}", ["a", "b"]),
        ("${input.flag}", True),
        ("${missing}", None),
        ("${ input.count + 1 }", 4),
        ("${'}'}", "}"),
        ("${input.name == \"}\" ? 1 : 2}", 2),
        ("n=${input.count}", "n=3"),
        ("${input.count}${input.count}", "33"),
        ("${input.name}-${input.count}!", "bob-3!"),
        ("x${missing}y", "xy"),
        ("${input.flag} ${null}", "true "),
        ("${item.price}/${2.0}", "2.5/2"),
        ("tags: ${input.tags}", 'tags: ["a","b"]'),
        ("cfg: ${ctx.limits}", 'cfg: {"max":10}'),
        (" ${input.count}", " 3"),
        (7, 7),
        (None, None),
        (True, True),
        (
            {"a": "${input.count}", "b": ["${input.name}", "lit", {"c": "${input.flag}"}], "d": 1},
            {"a": 3, "b": ["bob", "lit", {"c": True}], "d": 1},
        ),
        ({"keep": "x${missing}", "drop": "${missing}", "none": None}, {"keep": "x", "none": None}),
        (["${missing}", "${input.count}"], [None, 3]),
        (("${input.count}",), [3]),
    ],
)
def test_render(value: object, expected: object) -> None:
    result = render(value, SCOPE)
    assert result == expected
    assert type(result) is type(expected)


def test_render_does_not_touch_keys_or_input() -> None:
    value = {"${input.name}": "${input.name}"}
    assert render(value, SCOPE) == {"${input.name}": "bob"}
    assert value == {"${input.name}": "${input.name}"}


@pytest.mark.parametrize("text", ["${", "abc ${input.name", "${'}", "ok ${a} then ${b"])
def test_render_unterminated(text: str) -> None:
    with pytest.raises(ExprError) as info:
        render({"k": [text]}, SCOPE)
    assert "unterminated '${'" in str(info.value)
    assert info.value.expression == text
    assert info.value.position == text.rfind("${")


def test_render_bad_expression_names_the_expression() -> None:
    with pytest.raises(ExprError) as info:
        render("x ${1 +} y", {})
    assert info.value.expression == "1 +"
    assert info.value.position == 3
    with pytest.raises(ExprError):
        render({"a": "${1 / 0}"}, {})


def test_template_problems() -> None:
    definition = {
        "input": {
            "url": "https://${input.host}/x",
            "bad": "${a >}",
            "list": ["ok", "x ${1 +", {"deep": "${foo(1)}"}],
            "n": 3,
            "fine": "${length(steps.fetch.output.items) > 0 ? 'y' : 'n'}",
        },
        "route_labels": {"region": "${input.region ?? 'eu'}", "f": "${import}"},
    }
    problems = template_problems(definition)
    assert problems == [
        'input.bad: expression "a >": expected a value at position 3',
        'input.list[1]: expression "x ${1 +": unterminated \'${\' at position 2',
        "input.list[2].deep: expression \"foo(1)\": unknown function 'foo' "
        "(allowed: contains, endsWith, first, length, startsWith) at position 0",
        "route_labels.f: expression \"import\": forbidden word 'import' at position 0",
    ]
    assert template_problems({"a": "${x}", "b": ["plain", 1, None]}) == []
    assert template_problems("${") == ["expression \"${\": unterminated '${' at position 0"]
    # nothing is evaluated
    assert template_problems("${1 / 0}") == []


# ---------------------------------------------------------------------------------------------
# randomised checks (hypothesis is not a dependency; a seeded generator stands in)


def _random_int_expr(rng: random.Random, depth: int) -> str:
    if depth == 0 or rng.random() < 0.3:
        n = rng.randint(0, 20)
        return str(n) if rng.random() < 0.8 else f"(-{n})"
    op = rng.choice(["+", "-", "*", "%"])
    left = _random_int_expr(rng, depth - 1)
    right = _random_int_expr(rng, depth - 1)
    if op == "%":
        right = f"({right} * 0 + {rng.randint(1, 9)})"
    if rng.random() < 0.3:
        return f"({left} {op} {right})"
    return f"{left} {op} {right}"


def test_integer_arithmetic_agrees_with_python() -> None:
    rng = random.Random(20261201)
    for _ in range(500):
        text = _random_int_expr(rng, 4)
        try:
            expected = eval(text, {"__builtins__": {}})  # noqa: S307 - the test's own generated text
        except ZeroDivisionError:  # pragma: no cover - generator avoids it
            continue
        assert evaluate(text, {}) == expected, text


def test_comparisons_and_logic_agree_with_python() -> None:
    rng = random.Random(7)
    for _ in range(300):
        a, b, c = (rng.randint(-3, 3) for _ in range(3))
        op1, op2 = rng.choice(["<", "<=", ">", ">=", "==", "!="]), rng.choice(["&&", "||"])
        text = f"{a} {op1} {b} {op2} !({b} {op1} {c})"
        py = f"{a} {op1} {b} {'and' if op2 == '&&' else 'or'} not ({b} {op1} {c})"
        assert evaluate(text, {}) == bool(eval(py, {"__builtins__": {}})), text  # noqa: S307


def test_render_without_templates_is_identity() -> None:
    rng = random.Random(11)
    alphabet = "ab ${}$\\'\"x\n"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))).replace("${", "$ {")
        assert render(text, {}) == text
        assert render({"k": [text]}, {}) == {"k": [text]}
        assert template_problems(text) == []


def test_random_token_soup_only_ever_raises_expr_error() -> None:
    rng = random.Random(3)
    atoms = ["a", "b.c", "x[0]", "1", "2.5", "'s'", '"t"', "true", "null", "[1,2]", "length(a)",
             "first(x)", "contains(x, 1)", "endsWith(s, 'c')", "(", ")", "[", "]", "+", "-", "*", "/",
             "%", "==", "!=", "<", ">=", "&&", "||", "!", "not", "in", "?", ":", "??", ",", ".", "'",
             "\\", "${", "}", "1e5", "0"]
    scope = {"a": [1, "x", None, {"k": 2}], "b": {"c": 3}, "x": [0, 1.5], "s": "abc"}
    for _ in range(3000):
        text = " ".join(rng.choice(atoms) for _ in range(rng.randint(1, 9)))
        for attempt in (
            lambda: parse(text).evaluate(scope),
            lambda: render({"k": ["x ${" + text + "} y", "${" + text + "}"]}, scope),
        ):
            try:
                attempt()
            except ExprError:
                pass
        assert isinstance(template_problems("${" + text + "}"), list)
