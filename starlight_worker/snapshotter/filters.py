"""containerd's filter language (``containerd/filters``), parsed and matched without I/O.

A filter string is a comma-separated conjunction of selectors ``<fieldpath>[<op><value>]``:
``name==foo``, ``labels."containerd.io/snapshot.ref"==sha256:...,parent=="ns/1/x"``,
``labels.l`` (presence), ``kind!=view``, ``name~=^c[0-9]$``. Several filter strings are a
disjunction, and no filter string matches everything. Field path parts are plain
(``[A-Za-z0-9_]+``) or double-quoted; values are bare (up to the next comma or space) or quoted
with ``"`` (or ``/`` and ``|`` after ``~=``, for regular expressions).

The grammar follows containerd's ``filters/parser.go`` so that what containerd's metadata
layer sends a proxy snapshotter (``labels."containerd.io/snapshot.ref"==<target>,parent==<q>``)
parses the same way here. Regular expressions use Python's ``re`` with search semantics, which
agrees with Go's RE2 on the expressions containerd users write.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Sequence

import attrs

from starlight_core.errors import InvalidInput

__all__ = ["FieldLookup", "Filter", "Selector", "parse", "parse_all"]

# Resolves a field path to (value, present), like containerd's filters.Adaptor.
FieldLookup = Callable[[Sequence[str]], tuple[str, bool]]


class _Op(enum.Enum):
    PRESENT = ""
    EQUAL = "=="
    NOT_EQUAL = "!="
    MATCHES = "~="


@attrs.frozen
class Selector:
    fieldpath: tuple[str, ...]
    operator: _Op
    value: str = ""
    pattern: re.Pattern[str] | None = None

    def match(self, lookup: FieldLookup) -> bool:
        value, present = lookup(self.fieldpath)
        if self.operator is _Op.PRESENT:
            return present
        if self.operator is _Op.EQUAL:
            return present and value == self.value
        if self.operator is _Op.NOT_EQUAL:
            # containerd compares even when the field is absent (absent reads as "").
            return value != self.value
        assert self.pattern is not None
        return self.pattern.search(value) is not None


@attrs.frozen
class Filter:
    """Any of ``alternatives`` matches when all of its selectors do; no alternative: always."""

    alternatives: tuple[tuple[Selector, ...], ...] = ()

    def match(self, lookup: FieldLookup) -> bool:
        if not self.alternatives:
            return True
        return any(all(s.match(lookup) for s in conj) for conj in self.alternatives)


def parse_all(filters: Sequence[str]) -> Filter:
    """Parse filter strings (OR-ed); raise ``InvalidInput`` naming the bad one."""
    return Filter(tuple(parse(text) for text in filters))


def parse(text: str) -> tuple[Selector, ...]:
    """Parse one filter string into its AND-ed selectors (none for ``""``: match all)."""
    if not text:
        return ()
    return _Parser(text).selectors()


_FIELD = re.compile(r"[A-Za-z0-9_]+")
_QUOTES = frozenset('"/|')
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, message: str) -> InvalidInput:
        return InvalidInput(f"invalid filter {self.text!r} at offset {self.pos}: {message}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def selectors(self) -> tuple[Selector, ...]:
        result = [self.selector()]
        while True:
            ch = self.peek()
            if ch == "":
                return tuple(result)
            if ch != ",":
                raise self.error(f"unexpected input {ch!r}")
            self.pos += 1
            result.append(self.selector())

    def selector(self) -> Selector:
        fieldpath = self.fieldpath()
        if self.peek() in ("", ","):
            return Selector(fieldpath, _Op.PRESENT)
        op = self.operator()
        value = self.value(allow_regex_quotes=op is _Op.MATCHES)
        pattern = None
        if op is _Op.MATCHES:
            try:
                pattern = re.compile(value)
            except re.error as exc:
                raise self.error(f"bad regular expression {value!r}: {exc}") from None
        return Selector(fieldpath, op, value, pattern)

    def fieldpath(self) -> tuple[str, ...]:
        parts = [self.field()]
        while self.peek() == ".":
            self.pos += 1
            parts.append(self.field())
        return tuple(parts)

    def field(self) -> str:
        ch = self.peek()
        if ch == '"':
            return self.quoted()
        found = _FIELD.match(self.text, self.pos)
        if found is None:
            raise self.error("expected a field name or a quoted string")
        self.pos = found.end()
        return found.group()

    def operator(self) -> _Op:
        self.skip_space()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in "=!~":
            self.pos += 1
        spelled = self.text[start : self.pos]
        for op in (_Op.EQUAL, _Op.NOT_EQUAL, _Op.MATCHES):
            if spelled == op.value:
                return op
        self.pos = start
        raise self.error('expected an operator ("==", "!=" or "~=")')

    def value(self, *, allow_regex_quotes: bool) -> str:
        ch = self.peek()
        if ch in _QUOTES:
            if ch != '"' and not allow_regex_quotes:
                raise self.error(f"quote {ch!r} is only allowed after ~=")
            return self.quoted()
        if ch in ("", ",", "."):
            raise self.error("expected a value or a quoted string")
        start = self.pos
        while (
            self.pos < len(self.text)
            and self.text[self.pos] != ","
            and not self.text[self.pos].isspace()
        ):
            self.pos += 1
        return self.text[start : self.pos]

    def quoted(self) -> str:
        quote = self.text[self.pos]
        self.pos += 1
        out: list[str] = []
        while True:
            if self.pos >= len(self.text) or self.text[self.pos] == "\n":
                raise self.error("quoted string not terminated")
            ch = self.text[self.pos]
            self.pos += 1
            if ch == quote:
                return "".join(out)
            if ch != "\\":
                out.append(ch)
                continue
            out.append(self.escape(quote))

    def escape(self, quote: str) -> str:
        if self.pos >= len(self.text):
            raise self.error("escape at end of input")
        ch = self.text[self.pos]
        self.pos += 1
        if ch in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[ch]
        if ch in ("\\", quote):
            return ch
        widths = {"x": 2, "u": 4, "U": 8}
        if ch in widths:
            digits = self.text[self.pos : self.pos + widths[ch]]
            if len(digits) != widths[ch] or not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise self.error(f"bad \\{ch} escape")
            self.pos += widths[ch]
            code = int(digits, 16)
            if code > 0x10FFFF:
                raise self.error(f"bad \\{ch} escape")
            return chr(code)
        if ch in "01234567":
            digits = ch + self.text[self.pos : self.pos + 2]
            if len(digits) != 3 or not all(c in "01234567" for c in digits) or int(digits, 8) > 255:
                raise self.error("bad octal escape")
            self.pos += 2
            return chr(int(digits, 8))
        raise self.error(f"illegal escape \\{ch}")
