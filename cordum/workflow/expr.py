"""The workflow engine's safe expression language and ``${…}`` templates (spec §2.4).

A pure module: standard library only, no I/O, no ``eval``. A hand-written tokenizer feeds a
recursive-descent parser that builds an immutable AST; evaluating it only reads the scope mapping.

Grammar, lowest precedence first::

    expr        := coalesce ( "?" expr ":" expr )?
    coalesce    := or ( "??" or )*                  a ?? b: a unless a is null
    or          := and ( ("||" | "or") and )*       short-circuit, yields a bool
    and         := equality ( ("&&" | "and") equality )*
    equality    := relation ( ("==" | "!=") relation )*
    relation    := additive ( ("<" | "<=" | ">" | ">=" | "in" | "not" "in") additive )*
    additive    := term ( ("+" | "-") term )*
    term        := unary ( ("*" | "/" | "%") unary )*
    unary       := ("!" | "not" | "-") unary | postfix
    postfix     := primary ( "." NAME | "[" expr "]" )*
    primary     := NUMBER | STRING | true | false | null | nil | NAME | NAME "(" args ")"
                 | "(" expr ")" | "[" (expr ("," expr)*)? "]"

Unary operators bind tighter than every binary one (as in expr-lang): ``not a == b`` is
``(not a) == b``; write ``not (a == b)`` or ``a not in b``.

Semantics:
- A name or a path that does not exist evaluates to ``None``; ``.name`` only looks into mappings and
  ``[i]`` only into mappings, lists and strings (never ``getattr``); a list index out of range (negative
  counts from the end) gives ``None``.
- ``+`` adds two numbers or concatenates two strings; ``- * / %`` take numbers (``/`` always gives a
  float, ``%`` follows Python's sign rule); booleans are not numbers. Anything else, and division by
  zero, is an :class:`ExprError` naming the operator's position.
- ``== !=`` compare any values (a boolean equals only a boolean; ``1 == 1.0``); ``< <= > >=`` order two
  numbers or two strings, anything else is an error (so a missing value compared with a number is an
  error, as in the Go original).
- ``a in b``: element of a list, key of a mapping, substring of a string; ``null`` on the right is false.
- Functions (a fixed allow-list): ``length(x)`` (len of list/mapping/string, else 0), ``first(x)``
  (first element or null), ``contains(container, x)`` (as ``x in container``), ``startsWith(s, p)``,
  ``endsWith(s, p)`` (false unless both are strings).

Limits: expressions longer than ``MAX_EXPRESSION_LENGTH`` characters; nesting deeper than ``MAX_DEPTH``
(parentheses, unary operators, and the height of the tree, so a long ``a+a+a…`` chain counts too);
string results longer than ``MAX_STRING_LENGTH``; integer results outside 64 bits and
non-finite float results (errors, not wrap-around or inf); the spec's forbidden words anywhere in the text
(case-insensitive substring, as the Go sandbox does: ``steps.executor`` is rejected because it contains
``exec``); any name starting with ``_``. There is no repetition operator (no ``"a" * n``, no list
multiplication), so work and memory stay proportional to the expression and the scope.

Step ids may contain ``-`` and ``.``; reach them with an index: ``steps["fetch-data"].output``.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_DEPTH",
    "MAX_EXPRESSION_LENGTH",
    "MAX_INT",
    "MAX_STRING_LENGTH",
    "MIN_INT",
    "FORBIDDEN_WORDS",
    "FUNCTIONS",
    "Expr",
    "ExprError",
    "evaluate",
    "parse",
    "render",
    "template_problems",
    "truthy",
]

MAX_EXPRESSION_LENGTH = 4096
MAX_DEPTH = 64
MAX_STRING_LENGTH = 1 << 20  # 1 MiB of characters for any string an expression or template builds
FORBIDDEN_WORDS = (
    "import",
    "require",
    "reflect",
    "unsafe",
    "runtime",
    "os.exit",
    "exec",
    "__proto__",
    "constructor",
    "prototype",
)
# name -> (min args, max args)
FUNCTIONS: Mapping[str, tuple[int, int]] = {
    "length": (1, 1),
    "first": (1, 1),
    "contains": (2, 2),
    "startsWith": (2, 2),
    "endsWith": (2, 2),
}
_KEYWORDS = frozenset({"true", "false", "null", "nil", "and", "or", "not", "in"})
# Binary operator levels, lowest precedence first: spelling -> operator. "not in" is read by the parser.
_LEVELS: tuple[Mapping[str, str], ...] = (
    {"??": "??"},
    {"||": "||", "or": "||"},
    {"&&": "&&", "and": "&&"},
    {"==": "==", "!=": "!="},
    {"<": "<", "<=": "<=", ">": ">", ">=": ">=", "in": "in"},
    {"+": "+", "-": "-"},
    {"*": "*", "/": "/", "%": "%"},
)
_BINARY: Mapping[str, tuple[str, int]] = {
    spelling: (op, level) for level, ops in enumerate(_LEVELS) for spelling, op in ops.items()
}
# integer arithmetic results must fit a signed 64-bit int, as Go's do (Python's ints would grow without
# bound: a few thousand characters of multiplications over a large input number could take seconds)
MIN_INT, MAX_INT = -(1 << 63), (1 << 63) - 1
_SHOWN_CHARS = 200  # how much of a long expression an error message quotes


class ExprError(ValueError):
    """A syntax, limit or type error; names the expression and the 0-based character position."""

    def __init__(self, expression: str, position: int, reason: str) -> None:
        shown = expression if len(expression) <= _SHOWN_CHARS else expression[:_SHOWN_CHARS] + "…"
        quoted = json.dumps(shown, ensure_ascii=False)
        super().__init__(f"expression {quoted}: {reason} at position {position}")
        self.expression = expression
        self.position = position
        self.reason = reason


class _Fail(Exception):
    """Raised inside the parser and evaluator; turned into ExprError where the text is known."""

    def __init__(self, position: int, reason: str) -> None:
        super().__init__(reason)
        self.position = position
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Truthiness and value helpers


def truthy(value: Any) -> bool:
    """The spec's rule: None, False, "" and numeric zero are false; everything else is true.

    Empty lists and mappings are *true*, as in the Go original (its isTruthy has no collection case);
    write ``length(x) > 0`` to test for an empty collection.
    """
    if value is None or value is False:
        return False
    if isinstance(value, str):
        return value != ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value != 0
    return True


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "map"
    if isinstance(value, (list, tuple)):
        return "list"
    return type(value).__name__


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_number(a) and _is_number(b):
        return a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if type(a) is not type(b) and not (isinstance(a, str) and isinstance(b, str)):
        return False
    try:
        return bool(a == b)
    except Exception:  # a hostile __eq__ in scope data must not escape as a Python error
        return False


def _member(container: Any, item: Any, position: int) -> bool:
    if container is None:
        return False
    if isinstance(container, str):
        if not isinstance(item, str):
            raise _Fail(position, f"'in' needs a string on the left of a string, got {_type_name(item)}")
        return item in container
    if isinstance(container, Mapping):
        try:
            return item in container
        except TypeError:
            return False
    if isinstance(container, (list, tuple)):
        return any(_equal(item, element) for element in container)
    raise _Fail(position, f"'in' needs a list, map or string on the right, got {_type_name(container)}")


# ---------------------------------------------------------------------------------------------
# AST


class _Node:
    __slots__ = ()
    position: int
    height: int

    def eval(self, scope: Mapping[str, Any]) -> Any:  # pragma: no cover - every node overrides
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class _Literal(_Node):
    value: Any
    position: int
    height: int = 1

    def eval(self, scope: Mapping[str, Any]) -> Any:
        return self.value


@dataclass(frozen=True, slots=True)
class _Name(_Node):
    name: str
    position: int
    height: int = 1

    def eval(self, scope: Mapping[str, Any]) -> Any:
        return scope.get(self.name) if isinstance(scope, Mapping) else None


@dataclass(frozen=True, slots=True)
class _ListLiteral(_Node):
    items: tuple[_Node, ...]
    position: int
    height: int

    def eval(self, scope: Mapping[str, Any]) -> Any:
        return [item.eval(scope) for item in self.items]


@dataclass(frozen=True, slots=True)
class _Field(_Node):
    target: _Node
    name: str
    position: int
    height: int

    def eval(self, scope: Mapping[str, Any]) -> Any:
        value = self.target.eval(scope)
        if isinstance(value, Mapping):
            return value.get(self.name)
        return None


@dataclass(frozen=True, slots=True)
class _Index(_Node):
    target: _Node
    index: _Node
    position: int
    height: int

    def eval(self, scope: Mapping[str, Any]) -> Any:
        value = self.target.eval(scope)
        key = self.index.eval(scope)
        if isinstance(value, Mapping):
            try:
                return value.get(key)
            except TypeError:  # unhashable key
                return None
        if isinstance(value, (list, tuple, str)) and isinstance(key, int) and not isinstance(key, bool):
            if -len(value) <= key < len(value):
                return value[key]
        return None


@dataclass(frozen=True, slots=True)
class _Call(_Node):
    name: str
    args: tuple[_Node, ...]
    position: int
    height: int

    def eval(self, scope: Mapping[str, Any]) -> Any:
        values = [arg.eval(scope) for arg in self.args]
        name = self.name
        if name == "length":
            x = values[0]
            return len(x) if isinstance(x, (list, tuple, Mapping, str)) else 0
        if name == "first":
            x = values[0]
            if isinstance(x, (list, tuple, str)):
                return x[0] if x else None
            return None
        if name == "contains":
            return _member(values[0], values[1], self.position)
        if name in ("startsWith", "endsWith"):
            s, p = values
            if not (isinstance(s, str) and isinstance(p, str)):
                return False
            return s.startswith(p) if name == "startsWith" else s.endswith(p)
        raise _Fail(self.position, f"unknown function {name!r}")  # pragma: no cover - parser checks


@dataclass(frozen=True, slots=True)
class _Unary(_Node):
    op: str
    operand: _Node
    position: int
    height: int

    def eval(self, scope: Mapping[str, Any]) -> Any:
        value = self.operand.eval(scope)
        if self.op == "!":
            return not truthy(value)
        if not _is_number(value):
            raise _Fail(self.position, f"cannot negate {_type_name(value)}")
        return -value


@dataclass(frozen=True, slots=True)
class _Logical(_Node):
    op: str  # "&&", "||" or "??"
    left: _Node
    right: _Node
    position: int
    height: int

    def eval(self, scope: Mapping[str, Any]) -> Any:
        left = self.left.eval(scope)
        if self.op == "??":
            return left if left is not None else self.right.eval(scope)
        if self.op == "&&":
            return truthy(left) and truthy(self.right.eval(scope))
        return truthy(left) or truthy(self.right.eval(scope))


@dataclass(frozen=True, slots=True)
class _Conditional(_Node):
    test: _Node
    then: _Node
    otherwise: _Node
    position: int
    height: int

    def eval(self, scope: Mapping[str, Any]) -> Any:
        return self.then.eval(scope) if truthy(self.test.eval(scope)) else self.otherwise.eval(scope)


@dataclass(frozen=True, slots=True)
class _Binary(_Node):
    op: str
    left: _Node
    right: _Node
    position: int
    height: int

    def eval(self, scope: Mapping[str, Any]) -> Any:
        a = self.left.eval(scope)
        b = self.right.eval(scope)
        op = self.op
        if op == "==":
            return _equal(a, b)
        if op == "!=":
            return not _equal(a, b)
        if op == "in":
            return _member(b, a, self.position)
        if op == "not in":
            return not _member(b, a, self.position)
        if op in ("<", "<=", ">", ">="):
            if not ((_is_number(a) and _is_number(b)) or (isinstance(a, str) and isinstance(b, str))):
                raise _Fail(self.position, f"cannot compare {_type_name(a)} {op} {_type_name(b)}")
            if op == "<":
                return a < b
            if op == "<=":
                return a <= b
            if op == ">":
                return a > b
            return a >= b
        if op == "+" and isinstance(a, str) and isinstance(b, str):
            if len(a) + len(b) > MAX_STRING_LENGTH:
                raise _Fail(self.position, f"string result longer than {MAX_STRING_LENGTH} characters")
            return a + b
        if not (_is_number(a) and _is_number(b)):
            raise _Fail(self.position, f"cannot apply {op!r} to {_type_name(a)} and {_type_name(b)}")
        try:
            result = _arithmetic(op, a, b, self.position)
        except OverflowError:
            raise _Fail(self.position, "numeric overflow") from None
        if isinstance(result, int):
            if not MIN_INT <= result <= MAX_INT:
                raise _Fail(self.position, "integer overflow (results are 64-bit)")
        elif not math.isfinite(result):
            raise _Fail(self.position, "numeric overflow")
        return result


def _arithmetic(op: str, a: int | float, b: int | float, position: int) -> int | float:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0:
        raise _Fail(position, "division by zero")
    if op == "/":
        return a / b
    return a % b


@dataclass(frozen=True, slots=True)
class Expr:
    """A parsed expression: immutable, shareable, evaluated any number of times."""

    text: str
    root: _Node

    def evaluate(self, scope: Mapping[str, Any]) -> Any:
        try:
            return self.root.eval(scope if scope is not None else {})
        except _Fail as fail:
            raise ExprError(self.text, fail.position, fail.reason) from None
        except RecursionError:  # the tree is capped by MAX_DEPTH; only scope data can be this deep
            raise ExprError(self.text, 0, "a value in scope is nested too deeply") from None


# ---------------------------------------------------------------------------------------------
# Tokenizer

_OPERATORS = ("&&", "||", "??", "==", "!=", "<=", ">=", "<", ">", "!", "+", "-", "*", "/", "%",
              "?", ":", "(", ")", "[", "]", ".", ",")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"', "0": "\0",
            "b": "\b", "f": "\f", "/": "/", "$": "$", "{": "{", "}": "}"}


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "num", "str", "name", "op", "end"
    value: Any
    position: int


def _is_name_start(ch: str) -> bool:
    return ch == "_" or ("a" <= ch <= "z") or ("A" <= ch <= "Z")


def _is_name_char(ch: str) -> bool:
    return _is_name_start(ch) or ("0" <= ch <= "9")


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in " \t\r\n":
            i += 1
            continue
        start = i
        if "0" <= ch <= "9" or (ch == "." and i + 1 < n and "0" <= text[i + 1] <= "9"):
            i = _scan_number(text, i)
            raw = text[start:i]
            try:
                value: Any = float(raw) if any(c in raw for c in ".eE") else int(raw)
            except ValueError:
                raise _Fail(start, f"invalid number {raw!r}") from None
            if isinstance(value, float) and not math.isfinite(value):
                raise _Fail(start, f"number out of range {raw!r}")
            tokens.append(_Token("num", value, start))
            continue
        if ch in "'\"":
            value, i = _scan_string(text, i)
            tokens.append(_Token("str", value, start))
            continue
        if _is_name_start(ch):
            while i < n and _is_name_char(text[i]):
                i += 1
            name = text[start:i]
            if name.startswith("_"):
                raise _Fail(start, f"names starting with '_' are not allowed ({name!r})")
            tokens.append(_Token("name", name, start))
            continue
        for op in _OPERATORS:
            if text.startswith(op, i):
                tokens.append(_Token("op", op, start))
                i += len(op)
                break
        else:
            raise _Fail(start, f"unexpected character {ch!r}")
    tokens.append(_Token("end", None, n))
    return tokens


def _scan_number(text: str, i: int) -> int:
    n = len(text)
    while i < n and "0" <= text[i] <= "9":
        i += 1
    if i + 1 < n and text[i] == "." and "0" <= text[i + 1] <= "9":
        i += 1
        while i < n and "0" <= text[i] <= "9":
            i += 1
    if i < n and text[i] in "eE":
        j = i + 1
        if j < n and text[j] in "+-":
            j += 1
        if j < n and "0" <= text[j] <= "9":
            i = j
            while i < n and "0" <= text[i] <= "9":
                i += 1
    if i < n and _is_name_char(text[i]):
        raise _Fail(i, f"unexpected character {text[i]!r} in a number")
    return i


def _scan_string(text: str, i: int) -> tuple[str, int]:
    quote, start, n = text[i], i, len(text)
    i += 1
    out: list[str] = []
    while i < n:
        ch = text[i]
        if ch == quote:
            return "".join(out), i + 1
        if ch == "\\":
            if i + 1 >= n:
                break
            esc = text[i + 1]
            if esc == "u":
                digits = text[i + 2:i + 6]
                if len(digits) != 4 or any(c not in "0123456789abcdefABCDEF" for c in digits):
                    raise _Fail(i, "invalid \\u escape (want 4 hex digits)")
                out.append(chr(int(digits, 16)))
                i += 6
                continue
            if esc not in _ESCAPES:
                raise _Fail(i, f"unknown escape \\{esc}")
            out.append(_ESCAPES[esc])
            i += 2
            continue
        out.append(ch)
        i += 1
    raise _Fail(start, "unterminated string")


# ---------------------------------------------------------------------------------------------
# Parser


class _Parser:
    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.index = 0
        self.depth = 0

    # -- token helpers
    @property
    def token(self) -> _Token:
        return self.tokens[self.index]

    def _is(self, kind: str, *values: str) -> bool:
        tok = self.token
        return tok.kind == kind and (not values or tok.value in values)

    def _next(self) -> _Token:
        tok = self.tokens[self.index]
        if tok.kind != "end":
            self.index += 1
        return tok

    def _expect_op(self, op: str, what: str) -> _Token:
        if not self._is("op", op):
            raise _Fail(self.token.position, f"expected {what}")
        return self._next()

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Fail(self.token.position, f"expression nested deeper than {MAX_DEPTH}")

    @staticmethod
    def _height(position: int, *children: _Node) -> int:
        height = 1 + max((c.height for c in children), default=0)
        if height > MAX_DEPTH:
            raise _Fail(position, f"expression nested deeper than {MAX_DEPTH}")
        return height

    # -- grammar
    def parse(self) -> _Node:
        node = self.expression()
        if not self._is("end"):
            tok = self.token
            raise _Fail(tok.position, f"unexpected {_describe(tok)}")
        return node

    def expression(self) -> _Node:
        self._enter()
        try:
            test = self.binary()
            if self._is("op", "?"):
                pos = self._next().position
                then = self.expression()
                self._expect_op(":", "':' in a conditional")
                otherwise = self.expression()
                return _Conditional(test, then, otherwise, pos, self._height(pos, test, then, otherwise))
            return test
        finally:
            self.depth -= 1

    def binary(self, min_level: int = 0) -> _Node:
        """Left-associative binary operators by precedence climbing over _LEVELS.

        One Python frame per operand rather than one per precedence level, so deep nesting stays
        well inside the interpreter's recursion limit.
        """
        node = self.unary()
        while True:
            tok = self.token
            found = _BINARY.get(tok.value) if tok.kind in ("op", "name") else None
            if found is None and tok.kind == "name" and tok.value == "not":
                after = self.tokens[self.index + 1]
                if after.kind == "name" and after.value == "in":
                    found = ("not in", _BINARY["in"][1])
            if found is None or found[1] < min_level:
                return node
            op, level = found
            self._next()
            if op == "not in":
                self._next()
            right = self.binary(level + 1)
            height = self._height(tok.position, node, right)
            if op in ("??", "||", "&&"):
                node = _Logical(op, node, right, tok.position, height)
            else:
                node = _Binary(op, node, right, tok.position, height)

    def unary(self) -> _Node:
        if self._is("op", "!", "-") or self._is("name", "not"):
            tok = self._next()
            op = "-" if tok.value == "-" else "!"
            self._enter()
            try:
                operand = self.unary()
            finally:
                self.depth -= 1
            if op == "-" and isinstance(operand, _Literal) and _is_number(operand.value):
                return _Literal(-operand.value, tok.position)
            return _Unary(op, operand, tok.position, self._height(tok.position, operand))
        return self.postfix()

    def postfix(self) -> _Node:
        node = self.primary()
        while True:
            if self._is("op", "."):
                dot = self._next()
                tok = self.token
                if tok.kind != "name":
                    raise _Fail(tok.position, "expected a name after '.'")
                self._next()
                node = _Field(node, tok.value, dot.position, self._height(dot.position, node))
            elif self._is("op", "["):
                bracket = self._next()
                index = self.expression()
                self._expect_op("]", "']'")
                node = _Index(node, index, bracket.position, self._height(bracket.position, node, index))
            else:
                return node

    def primary(self) -> _Node:
        tok = self.token
        if tok.kind in ("num", "str"):
            self._next()
            return _Literal(tok.value, tok.position)
        if tok.kind == "name":
            name = tok.value
            if name in ("true", "false"):
                self._next()
                return _Literal(name == "true", tok.position)
            if name in ("null", "nil"):
                self._next()
                return _Literal(None, tok.position)
            if name in _KEYWORDS:
                raise _Fail(tok.position, "expected a value")
            self._next()
            if self._is("op", "("):
                return self.call(tok)
            return _Name(name, tok.position)
        if tok.kind == "op" and tok.value == "(":
            self._next()
            node = self.expression()
            self._expect_op(")", "')'")
            return node
        if tok.kind == "op" and tok.value == "[":
            self._next()
            items: list[_Node] = []
            if not self._is("op", "]"):
                items.append(self.expression())
                while self._is("op", ","):
                    self._next()
                    items.append(self.expression())
            self._expect_op("]", "']' or ','")
            return _ListLiteral(tuple(items), tok.position, self._height(tok.position, *items))
        raise _Fail(tok.position, "expected a value")

    def call(self, name_tok: _Token) -> _Node:
        name = name_tok.value
        if name not in FUNCTIONS:
            allowed = ", ".join(sorted(FUNCTIONS))
            raise _Fail(name_tok.position, f"unknown function {name!r} (allowed: {allowed})")
        self._next()  # "("
        args: list[_Node] = []
        if not self._is("op", ")"):
            args.append(self.expression())
            while self._is("op", ","):
                self._next()
                args.append(self.expression())
        self._expect_op(")", "')' or ','")
        low, high = FUNCTIONS[name]
        if not low <= len(args) <= high:
            want = str(low) if low == high else f"{low}-{high}"
            raise _Fail(name_tok.position, f"{name}() takes {want} argument(s), got {len(args)}")
        return _Call(name, tuple(args), name_tok.position, self._height(name_tok.position, *args))


def _describe(tok: _Token) -> str:
    if tok.kind == "end":
        return "end of expression"
    if tok.kind == "str":
        return "string"
    return repr(tok.value) if tok.kind != "num" else f"number {tok.value!r}"


# ---------------------------------------------------------------------------------------------
# Public entry points


def parse(text: str) -> Expr:
    """Parse (cached per string) or raise ExprError naming the expression and the position."""
    if not isinstance(text, str):
        raise ExprError(repr(text), 0, f"an expression must be a string, got {_type_name(text)}")
    return _parse_cached(text)


@functools.lru_cache(maxsize=2048)
def _parse_cached(text: str) -> Expr:
    if len(text) > MAX_EXPRESSION_LENGTH:
        raise ExprError(text, MAX_EXPRESSION_LENGTH,
                        f"longer than {MAX_EXPRESSION_LENGTH} characters ({len(text)})")
    lowered = text.lower()
    for word in FORBIDDEN_WORDS:
        at = lowered.find(word)
        if at >= 0:
            raise ExprError(text, at, f"forbidden word {word!r}")
    if not text.strip():
        raise ExprError(text, 0, "empty expression")
    try:
        return Expr(text, _Parser(_tokenize(text)).parse())
    except _Fail as fail:
        raise ExprError(text, fail.position, fail.reason) from None


def evaluate(text: str, scope: Mapping[str, Any]) -> Any:
    """Parse (cached) and evaluate ``text`` against ``scope``."""
    return parse(text).evaluate(scope)


# ---------------------------------------------------------------------------------------------
# Templates


def _split_template(text: str) -> list[tuple[str, int, str]]:
    """Split into pieces ("text", offset, literal) and ("expr", offset, source); offset of the source.

    The closing ``}`` is the first one outside a quoted string; an unclosed ``${`` raises _Fail with
    the position of the ``${``.
    """
    pieces: list[tuple[str, int, str]] = []
    i, n = 0, len(text)
    while i < n:
        start = text.find("${", i)
        if start < 0:
            pieces.append(("text", i, text[i:]))
            break
        if start > i:
            pieces.append(("text", i, text[i:start]))
        j = start + 2
        quote: str | None = None
        while j < n:
            ch = text[j]
            if quote:
                if ch == "\\":
                    j += 2
                    continue
                if ch == quote:
                    quote = None
            elif ch in "'\"":
                quote = ch
            elif ch == "}":
                break
            j += 1
        if j >= n:
            raise _Fail(start, "unterminated '${'")
        pieces.append(("expr", start + 2, text[start + 2:j]))
        i = j + 1
    return pieces


def _stringify(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e21:
            return str(int(value))
        return repr(value)
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError):
        return str(value)


def _single_template(text: str) -> str | None:
    """The source of ``text`` when it is exactly one ``${…}`` and nothing else."""
    if not (text.startswith("${") and text.endswith("}")):
        return None
    pieces = _split_template(text)
    if len(pieces) == 1 and pieces[0][0] == "expr":
        return pieces[0][2]
    return None


def _render_string(text: str, scope: Mapping[str, Any]) -> Any:
    if "${" not in text:
        return text
    try:
        single = _single_template(text)
        pieces = _split_template(text) if single is None else []
    except _Fail as fail:
        raise ExprError(text, fail.position, fail.reason) from None
    if single is not None:
        return evaluate(single, scope)
    out: list[str] = []
    size = 0
    for kind, offset, piece in pieces:
        chunk = piece if kind == "text" else _stringify(evaluate(piece, scope))
        size += len(chunk)
        if size > MAX_STRING_LENGTH:
            raise ExprError(text, offset, f"rendered text longer than {MAX_STRING_LENGTH} characters")
        out.append(chunk)
    return "".join(out)


def render(value: Any, scope: Mapping[str, Any]) -> Any:
    """Render ``${…}`` templates in a value (spec §2.4).

    - a string that is exactly one ``${expr}`` becomes the expression's value, of its own type;
    - a string mixing text and templates becomes a string (None renders as "", booleans as
      true/false, lists and maps as compact JSON);
    - mappings and lists are rendered recursively (tuples come back as lists); a mapping key whose
      value is a single template that resolved to None is left out;
    - anything else is returned unchanged; an unterminated ``${`` or a bad expression is an ExprError.
    """
    return _render(value, scope, 0)


def _render(value: Any, scope: Mapping[str, Any], depth: int) -> Any:
    if depth > 256:
        raise ExprError("", 0, "template value nested deeper than 256")
    if isinstance(value, str):
        return _render_string(value, scope)
    if isinstance(value, Mapping):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            rendered = _render(item, scope, depth + 1)
            if rendered is None and isinstance(item, str) and _single_template_safe(item):
                continue
            out[key] = rendered
        return out
    if isinstance(value, (list, tuple)):
        return [_render(item, scope, depth + 1) for item in value]
    return value


def _single_template_safe(text: str) -> bool:
    try:
        return _single_template(text) is not None
    except _Fail:
        return False


def template_problems(value: Any) -> list[str]:
    """Every syntax problem in the templates inside ``value``, without evaluating anything.

    Each entry is prefixed with where it was found (``input.url: expression "a >": …``), the path
    using ``.key`` for mapping keys and ``[i]`` for list items; an empty list means all is well.
    """
    problems: list[str] = []
    _collect(value, "", problems, 0)
    return problems


def _collect(value: Any, path: str, problems: list[str], depth: int) -> None:
    where = f"{path}: " if path else ""
    if depth > 256:
        problems.append(f"{where}value nested deeper than 256")
        return
    if isinstance(value, str):
        if "${" not in value:
            return
        try:
            pieces = _split_template(value)
        except _Fail as fail:
            problems.append(where + str(ExprError(value, fail.position, fail.reason)))
            return
        for kind, _offset, source in pieces:
            if kind == "expr":
                try:
                    parse(source)
                except ExprError as exc:
                    problems.append(where + str(exc))
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _collect(item, f"{path}.{key}" if path else str(key), problems, depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _collect(item, f"{path}[{i}]", problems, depth + 1)
