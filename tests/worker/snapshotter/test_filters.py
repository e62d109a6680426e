"""containerd's filter language: the cases of containerd's ``filters/filter_test.go`` plus the
exact filter its metadata layer sends for remote snapshots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs
import pytest

from starlight_core.errors import InvalidInput
from starlight_worker.snapshotter.filters import parse, parse_all


@attrs.frozen
class Entry:
    name: str
    other: str = ""
    labels: Mapping[str, str] = attrs.field(factory=dict)

    def lookup(self, fieldpath: Sequence[str]) -> tuple[str, bool]:
        if fieldpath[0] == "name":
            return self.name, bool(self.name)
        if fieldpath[0] == "other":
            return self.other, bool(self.other)
        if fieldpath[0] == "labels":
            key = ".".join(fieldpath[1:])
            return self.labels.get(key, ""), key in self.labels
        return "", False


CORPUS = [
    Entry("foo", labels={"foo": "true"}),
    Entry("bar"),
    Entry("foo", labels={"foo": "present", "more complex label": "present"}),
    Entry("bar", labels={"bar": "true"}),
    Entry("fooer", labels={'more complex label with \\ and "': "present"}),
    Entry("fooer", labels={'more complex label with \\ and ".post': "present"}),
    Entry("baz", other="too complex, yo"),
    Entry("bazo", other="abc"),
    Entry("compound", labels={"foo": "omg_asdf.asdf-qwer"}),
]


def matching(text: str) -> list[int]:
    selectors = parse_all([text])
    return [i for i, entry in enumerate(CORPUS) if selectors.match(entry.lookup)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", list(range(9))),
        ("name", list(range(9))),
        ("labels.foo", [0, 2, 8]),
        ("labels.foo,name", [0, 2, 8]),
        ("labels.foo==true", [0]),
        ("labels.foo==omg_asdf.asdf-qwer", [8]),
        ("name==bar", [1, 3]),
        ("name!=bar", [0, 2, 4, 5, 6, 7, 8]),
        ("name==bar,labels.bar", [3]),
        ('other=="too complex, yo"', [6]),
        ("other~=[abc]+,name!=foo", [6, 7]),
        ("other~=/[abc]+/,name!=foo", [6, 7]),
        ("other~=/[abc]{1,2}/,name!=foo", [6, 7]),
        ('other~=/[abc]{0,1}"\\//,name!=foo', []),
        ("name==bar,labels.bar==true", [3]),
        ("name==bar,labels.bar==wrong", []),
        ('name==foo,labels."more complex label"', [2]),
        ('labels."more complex label with \\\\ and \\""==present', [4]),
        ('labels."more complex label with \\\\ and \\"".post==present', [5]),
        (" name == bar ", [1, 3]),
    ],
)
def test_containerd_filter_cases(text: str, expected: list[int]) -> None:
    assert matching(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "labels.|foo|==omg_asdf.asdf-qwer",  # alternative quotes only for regexps
        'labels.?"more complex label with \\\\ and \\"".post==present',
        "name==foo,",
        "labels.",
        "image~=,id?=?fbaq",
        "labels.ns/key==value",
        "labels.key==/value",
        "name===foo",
        "name=foo",
        'labels."unterminated',
        'name=="bad \\q escape"',
        "name~=([unclosed",
        "name==foo bar",
    ],
)
def test_bad_filters_are_invalid_input(text: str) -> None:
    with pytest.raises(InvalidInput, match="invalid filter"):
        parse(text)


def test_several_filters_are_alternatives() -> None:
    selectors = parse_all(["name==foo", "name==bar"])
    assert [e.name for e in CORPUS if selectors.match(e.lookup)] == ["foo", "bar", "foo", "bar"]


def test_escapes_in_quoted_values() -> None:
    [selector] = parse('name=="a\\tb\\x41\\u00e9\\101\\\\"')
    assert selector.value == "a\tbAéA\\"


def test_not_equal_matches_absent_fields() -> None:
    # containerd compares the empty string when the field is absent.
    assert matching("other!=abc") == [0, 1, 2, 3, 4, 5, 6, 8]
    assert matching('other!=""') == [6, 7]


def test_containerd_remote_snapshot_filter() -> None:
    """What metadata/snapshot.go sends after a remote Prepare answered ALREADY_EXISTS."""
    target = "sha256:" + "ab" * 32
    parent = "default/12/sha256:" + "cd" * 32
    text = f'labels."containerd.io/snapshot.ref"=={target},parent=="{parent}"'
    selectors = parse(text)
    assert [s.fieldpath for s in selectors] == [
        ("labels", "containerd.io/snapshot.ref"),
        ("parent",),
    ]
    assert [s.value for s in selectors] == [target, parent]
