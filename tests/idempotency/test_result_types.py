"""A replay is equal in value *and type* to the first result, for the types people return.

Datetimes (time zone and fold kept), dates, times, timedeltas, Decimal (exponent kept), UUID,
bytes, tuples, sets, frozensets, Enums, dicts with keys that are not strings, dataclasses,
pydantic models, TypedDicts and NamedTuples, nested anywhere in a dict, list or `Any` result,
with or without a return annotation, on every store. The body runs once per key. A result
that cannot be stored is known before the first call returns (one `NodekitWarning`); its
replay raises an error naming the node and saying the effect ran. Records are JSON only:
plain JSON written before tagged JSON existed still replays, and a tagged record that names a
class nobody imported is corrupt, never re-run and never imported.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import enum
import itertools
import math
import sys
import uuid
import warnings
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from typing import Any, NamedTuple, TypedDict
from zoneinfo import ZoneInfo

import pytest
import typing_extensions
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, PrivateAttr, TypeAdapter

import nodekit as nk

from .conftest import Backend

# ---------------------------------------------------------------------------- result types


class Color(enum.Enum):
    RED = "red"
    BLUE = (1, "b")


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Perm(enum.Flag):
    R = 1
    W = 2


class Point(NamedTuple):
    x: Any
    y: Any = None


@dataclasses.dataclass(frozen=True)
class Frozen:
    """Its `__post_init__` adds an attribute; a replay keeps it without running it again."""

    a: Any
    b: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "seen", type(self.a).__name__)


@dataclasses.dataclass(slots=True)
class Slotted:
    a: Any


class Model(BaseModel):
    model_config = ConfigDict(extra="allow")

    a: Any = None
    b: Any = None


class Secretive(BaseModel):
    """A model with a private attribute: set after construction, kept on replay."""

    name: str
    _token: str = PrivateAttr(default="unset")


def secretive(name: str, token: str) -> Secretive:
    model = Secretive(name=name)
    model._token = token
    return model


class Row(typing_extensions.TypedDict):
    """A TypedDict pydantic can validate on Python 3.11."""

    when: dt.datetime
    amount: Decimal


class PlainRow(TypedDict):
    """`typing.TypedDict`: pydantic refuses it before Python 3.12; stored like a dict."""

    when: dt.datetime
    amount: Decimal


ZONES = [
    dt.UTC,
    dt.timezone(dt.timedelta(hours=5, minutes=30)),
    dt.timezone(dt.timedelta(hours=-8), "PST"),
    ZoneInfo("Europe/Paris"),
    ZoneInfo("America/New_York"),
]

# one of each, nested in each other: what the async twin and the annotated tests replay
EXAMPLES: dict[str, Any] = {
    "datetime": dt.datetime(2024, 11, 3, 1, 30, tzinfo=ZoneInfo("America/New_York"), fold=1),
    "naive-datetime": dt.datetime(2024, 1, 2, 3, 4, 5, 6),
    "fixed-offset": dt.datetime(2024, 1, 2, tzinfo=dt.timezone(dt.timedelta(hours=-8), "PST")),
    "date": dt.date(2024, 2, 29),
    "time": dt.time(23, 59, 59, 999999, tzinfo=dt.UTC),
    "timedelta": dt.timedelta(days=-2, seconds=5, microseconds=7),
    "decimal": Decimal("1.50"),
    "decimal-nan": Decimal("NaN"),
    "uuid": uuid.UUID(int=7),
    "bytes": b"\x00\xffnk1:",
    "tuple": (1, (2.5, "x"), []),
    "set": {1, "a", (2, 3)},
    "frozenset": frozenset({Decimal("2.0"), dt.date(2020, 1, 1)}),
    "enum": [Color.RED, Color.BLUE, Level.HIGH, Perm.R | Perm.W],
    "keys": {1: "int", (1, "a"): "tuple", Level.LOW: "enum", None: "none"},
    "tag-key": {"$nk": "decimal", "v": "1"},
    "dataclass": Frozen(Decimal("1.0"), (1,)),
    "slots": Slotted({"z": frozenset({1})}),
    "model": Model(a=Decimal("3.10"), extra=dt.date(2020, 1, 1)),
    "private": secretive("s", "t-1"),
    "namedtuple": Point(Level.LOW, Point(b"", None)),
    "typeddict": Row(when=dt.datetime(2024, 1, 2, tzinfo=dt.UTC), amount=Decimal("9.90")),
    "bool-key": {True: "bool", "1": "str"},
    "floats": [float("nan"), float("inf"), -0.0, 1e308, True, 1, 1.0],
    "plain": {"a": [1, "b", None, 2.5, {"c": False}]},
}


# ---------------------------------------------------------------------------- exact equality


def assert_exact(got: Any, want: Any, path: str = "result") -> None:
    """`got` equals `want` in value and type all the way down (written apart from nodekit's)."""
    assert type(got) is type(want), f"{path}: {type(got)} is not {type(want)}"
    if isinstance(want, dict):
        assert len(got) == len(want), path
        for (gk, gv), (wk, wv) in zip(got.items(), want.items(), strict=True):
            assert_exact(gk, wk, f"{path} key")
            assert_exact(gv, wv, f"{path}[{wk!r}]")
    elif isinstance(want, list | tuple):  # NamedTuples too
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_exact(g, w, f"{path}[{i}]")
    elif isinstance(want, set | frozenset):
        assert len(got) == len(want), path
        left = list(got)
        for w in want:  # each wanted member has an exact twin
            twins = [g for g in left if g == w and _exact(g, w)]
            assert twins, f"{path}: {w!r} missing"
            left.remove(twins[0])
    elif isinstance(want, float):
        assert (math.isnan(got) and math.isnan(want)) or (
            got == want and math.copysign(1, got) == math.copysign(1, want)
        ), f"{path}: {got!r} != {want!r}"
    elif isinstance(want, Decimal):
        assert str(got) == str(want), path  # the exponent too: 1.50 is not 1.5
    elif isinstance(want, dt.datetime | dt.time):
        assert got.isoformat() == want.isoformat(), path
        assert got.fold == want.fold, f"{path}: fold"
        assert type(got.tzinfo) is type(want.tzinfo), f"{path}: tzinfo type"
        assert str(got.tzinfo) == str(want.tzinfo), f"{path}: zone"
    elif isinstance(want, BaseModel):
        assert_exact(dict(got.__dict__), dict(want.__dict__), f"{path}.fields")
        assert_exact(got.__pydantic_extra__, want.__pydantic_extra__, f"{path}.extra")
        assert got.model_fields_set == want.model_fields_set, f"{path}: fields set"
        assert got.__pydantic_private__ == want.__pydantic_private__, f"{path}: private"
    elif dataclasses.is_dataclass(want):
        state = {f.name: getattr(want, f.name) for f in dataclasses.fields(want)}
        got_state = {f.name: getattr(got, f.name) for f in dataclasses.fields(got)}
        assert_exact(got_state, state, f"{path}.fields")
        if hasattr(want, "__dict__"):
            assert_exact(dict(vars(got)), dict(vars(want)), f"{path}.__dict__")
    elif isinstance(want, enum.Enum):
        assert got is want, path
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def _exact(got: Any, want: Any) -> bool:
    try:
        assert_exact(got, want)
    except AssertionError:
        return False
    return True


# ---------------------------------------------------------------------------- strategies

finite_floats = st.floats(allow_nan=False, allow_infinity=False)
times_zones = st.none() | st.sampled_from(ZONES)
hashables = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | finite_floats
    | st.text(max_size=6)
    | st.decimals(allow_nan=False, allow_infinity=False, places=2)
    | st.uuids()
    | st.binary(max_size=4)
    | st.dates()
    | st.sampled_from([*Color, *Level, Perm.R | Perm.W]),
    lambda inner: st.lists(inner, max_size=3).map(tuple) | st.frozensets(inner, max_size=3),
    max_leaves=4,
)
leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.decimals()
    | st.uuids()
    | st.binary(max_size=8)
    | st.datetimes(timezones=times_zones)
    | st.dates()
    | st.times(timezones=times_zones)
    | st.timedeltas()
    | st.sampled_from([*Color, *Level, Perm.R | Perm.W])
)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=4) | st.just("$nk"), inner, max_size=4)
        | st.dictionaries(hashables, inner, max_size=3)
        | st.sets(hashables, max_size=3)
        | st.frozensets(hashables, max_size=3)
        | st.builds(Point, inner, inner)
        | st.builds(Frozen, inner, inner)
        | st.builds(Slotted, inner)
        | st.builds(Model, a=inner, b=inner)
        | st.builds(lambda a, x: Model(a=a, x=x), inner, inner)  # an extra field
        | st.builds(
            lambda w, a: Row(when=w, amount=a), st.datetimes(timezones=times_zones), st.decimals()
        )
    )


result_values = st.recursive(leaves, _containers, max_leaves=10)


# ---------------------------------------------------------------------------- nodes

# how a node declares its result: the value is returned bare or wrapped to fit the annotation
SHAPES: dict[str, tuple[Any, Callable[[Any], Any]]] = {
    "unannotated": (None, lambda v: v),
    "Any": (Any, lambda v: v),
    "object": (object, lambda v: v),
    "dict[str, Any]": (dict[str, Any], lambda v: {"value": v}),
    "list[Any]": (list[Any], lambda v: [v]),
    "bare dict": (dict, lambda v: {"value": v}),
}


class Results:
    """Keyed nodes, sync or async, that return whatever the test gives for a key."""

    def __init__(self, store: Any, *, is_async: bool = False) -> None:
        self.store = store
        self.is_async = is_async
        self.given: dict[str, Any] = {}
        self.runs: Counter[str] = Counter()
        self._keys = itertools.count()

    def node(self, annotation: Any, name: str = "result") -> Any:
        given, runs = self.given, self.runs

        if self.is_async:

            async def body(order: str) -> Any:
                runs[order] += 1
                return given[order]

        else:

            def body(order: str) -> Any:  # type: ignore[misc]
                runs[order] += 1
                return given[order]

        if annotation is None:
            del body.__annotations__["return"]
        else:
            body.__annotations__["return"] = annotation
        policy = nk.Idempotency(key=lambda order: order, store=self.store)
        return nk.node(name=name, idempotency=policy)(body)

    def key(self, value: Any) -> str:
        order = f"o-{next(self._keys)}"
        self.given[order] = value
        return order


UNSTORED = r"node .* its result cannot be stored"  # the warning's message


def replays_exactly(node: Any, results: Results, value: Any) -> None:
    """The first call returns the value, the second an exact copy; the body ran once."""
    order = results.key(value)
    assert node(order) is value
    assert_exact(node(order), value)
    assert results.runs[order] == 1


async def areplays_exactly(node: Any, results: Results, value: Any) -> None:
    order = results.key(value)
    assert await node(order) is value
    assert_exact(await node(order), value)
    assert results.runs[order] == 1


# ---------------------------------------------------------------------------- replay fidelity

EXAMPLES_BY_STORE = {"memory": 200, "sqlite": 100, "redis": 50, "postgres": 50}


def test_any_result_replays_exactly_with_or_without_an_annotation(backend: Backend) -> None:
    """Generated results of every supported type, nested, under each open annotation."""
    results = Results(backend.make())
    nodes = {
        shape: (results.node(annotation, name=f"r-{i}"), wrap)
        for i, (shape, (annotation, wrap)) in enumerate(SHAPES.items())
    }

    @settings(
        max_examples=EXAMPLES_BY_STORE[backend.kind],
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(value=result_values, shape=st.sampled_from(list(SHAPES)))
    def check(value: Any, shape: str) -> None:
        node, wrap = nodes[shape]
        with warnings.catch_warnings():  # a supported value is stored: no warning
            warnings.filterwarnings("error", UNSTORED)
            replays_exactly(node, results, wrap(value))

    check()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_listed_type_replays_exactly(backend: Backend, shape: str) -> None:
    annotation, wrap = SHAPES[shape]
    results = Results(backend.make())
    node = results.node(annotation)
    for value in EXAMPLES.values():
        replays_exactly(node, results, wrap(value))
    replays_exactly(node, results, wrap(EXAMPLES))  # all of them in one result


async def test_each_listed_type_replays_exactly_async(abackend: Backend) -> None:
    results = Results(abackend.make(), is_async=True)
    node = results.node(None)
    for value in EXAMPLES.values():
        await areplays_exactly(node, results, value)
    await areplays_exactly(node, results, [EXAMPLES])


@pytest.mark.parametrize(
    ("annotation", "value"),
    [
        pytest.param(Model, Model(a=Decimal("1.50"), b={1: (2,)}), id="model-holding-any"),
        pytest.param(Model, Model(a=1), id="model-fields-set"),
        pytest.param(Frozen, Frozen(dt.date(2020, 1, 1)), id="dataclass"),
        pytest.param(Point, Point(Decimal("1.0"), {"a"}), id="namedtuple"),
        pytest.param(Row, EXAMPLES["typeddict"], id="typeddict"),
        pytest.param(PlainRow, EXAMPLES["typeddict"], id="typing-typeddict"),
        pytest.param(list[Row], [EXAMPLES["typeddict"]], id="list-of-typeddict"),
        pytest.param(int, Level.HIGH, id="intenum-for-int"),
        pytest.param(int, True, id="bool-for-int"),
        pytest.param(float, 1, id="int-for-float"),
        pytest.param(list[int], (1, 2), id="tuple-for-list"),
        pytest.param(dict[str, Decimal], {"a": Decimal("1.50")}, id="typed-dict"),
        pytest.param(tuple[Color, set[int]], (Color.RED, {1}), id="typed-tuple"),
        pytest.param(dt.datetime, EXAMPLES["datetime"], id="zoned-datetime"),
        pytest.param(Decimal, Decimal("-0.000"), id="decimal-exponent"),
    ],
)
def test_an_annotated_result_replays_exactly_even_when_it_is_not_the_annotated_type(
    backend: Backend, annotation: Any, value: Any
) -> None:
    """The annotation is a fast path, never a conversion: the replay is what was returned."""
    results = Results(backend.make())
    replays_exactly(results.node(annotation), results, value)


def test_a_local_class_named_in_the_annotation_replays(backend: Backend) -> None:
    @dataclasses.dataclass
    class Line:
        sku: str
        price: Decimal

    results = Results(backend.make())
    node = results.node(dict[str, list[Line]])
    replays_exactly(node, results, {"lines": [Line("a", Decimal("1.10"))]})
    node = results.node(dict[str, Any] | Line, name="other")
    replays_exactly(node, results, {"lines": (Line("a", Decimal("1.10")),)})


# ---------------------------------------------------------------------------- unstorable


def _local_class() -> type:
    @dataclasses.dataclass
    class Local:
        n: int

    return Local


def test_a_result_that_cannot_be_stored_warns_once_and_its_replay_says_the_effect_ran(
    backend: Backend,
) -> None:
    """A class defined in a function and not in the annotation: the call still returns."""
    local = _local_class()
    results = Results(backend.make())
    node = results.node(dict[str, Any], name="charge")
    value = {"receipt": local(1)}
    order = results.key(value)
    with pytest.warns(nk.NodekitWarning, match=UNSTORED) as caught:
        assert node(order) is value
    (warning,) = [w for w in caught if "cannot be stored" in str(w.message)]
    text = str(warning.message)
    assert "'charge'" in text
    assert "Local" in text
    assert "module level" in text
    assert warning.filename == __file__  # where the node was called

    with pytest.raises(nk.NodekitError) as raised:
        node(order)
    assert raised.value.node == "charge"
    assert "'charge'" in str(raised.value)
    assert "effect happened" in str(raised.value)
    assert results.runs[order] == 1

    with warnings.catch_warnings():  # once per node and type
        warnings.filterwarnings("error", UNSTORED)
        other = results.key({"receipt": local(2)})
        node(other)
    with pytest.raises(nk.NodekitError, match="effect happened"):
        node(other)
    assert results.runs[other] == 1


async def test_a_result_that_cannot_be_stored_warns_once_async(abackend: Backend) -> None:
    local = _local_class()
    results = Results(abackend.make(), is_async=True)
    node = results.node(None, name="charge")
    value = [local(1)]
    order = results.key(value)
    with pytest.warns(nk.NodekitWarning, match=r"'charge'.*Local"):
        assert await node(order) is value
    with pytest.raises(nk.NodekitError, match=r"'charge'.*effect happened"):
        await node(order)
    assert results.runs[order] == 1


def test_an_unsupported_type_warns_with_the_fix(backend: Backend) -> None:
    results = Results(backend.make())
    node = results.node(None, name="charge")
    order = results.key({"lock": asyncio.Lock()})
    with pytest.warns(nk.NodekitWarning, match=r"asyncio\.locks\.Lock.*JSON-friendly"):
        node(order)
    with pytest.raises(nk.NodekitError, match="effect happened"):
        node(order)
    assert results.runs[order] == 1


# ---------------------------------------------------------------------------- records


@pytest.mark.parametrize(
    ("annotation", "stored", "replayed"),
    [
        pytest.param(None, '{"a":[1,2.5,"x",null,true]}', {"a": [1, 2.5, "x", None, True]}),
        pytest.param(None, "null", None, id="null"),
        pytest.param(
            tuple[Decimal, dt.datetime],
            '["1.50","2024-01-02T03:04:05Z"]',
            (Decimal("1.50"), dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)),
            id="typed",
        ),
        pytest.param(Model, '{"a":"x","b":[1]}', Model(a="x", b=[1]), id="model"),
    ],
)
def test_a_record_written_as_plain_json_still_replays(
    backend: Backend, annotation: Any, stored: str, replayed: Any
) -> None:
    """Records from before tagged JSON (written exactly like this) decode as they did."""
    store = backend.make()
    results = Results(store)
    node = results.node(annotation)
    order = results.key(replayed)
    node(order)
    backend.corrupt(store, result=stored)
    got = node(order)
    assert got == replayed
    assert_exact(got, TypeAdapter(annotation or Any).validate_json(stored))  # as before
    assert results.runs[order] == 1


@pytest.mark.parametrize(
    "stored",
    [
        pytest.param('nk1:{"$nk":"enum","c":"tabnanny:NannyNag","v":1}', id="unimported-module"),
        pytest.param('nk1:{"$nk":"enum","c":"nowhere:Ghost","v":1}', id="unknown-module"),
        pytest.param(f'nk1:{{"$nk":"dataclass","c":"{__name__}:Color","v":{{}}}}', id="wrong-kind"),
        pytest.param('nk1:{"$nk":"bogus","v":1}', id="unknown-tag"),
        pytest.param('nk1:{"$nk":"decimal","v":"x"}', id="bad-value"),
        pytest.param("nk1:{not json", id="not-json"),
    ],
)
def test_a_tagged_record_that_does_not_decode_is_corrupt_and_never_re_runs(
    backend: Backend, stored: str
) -> None:
    assert "tabnanny" not in sys.modules
    store = backend.make()
    results = Results(store)
    node = results.node(None)
    order = results.key(Decimal("1"))
    node(order)
    backend.corrupt(store, result=stored)
    with pytest.raises(nk.IdempotencyCorruptRecord, match="node was not run"):
        node(order)
    assert results.runs[order] == 1
    assert "tabnanny" not in sys.modules  # a record never imports a module


def test_results_are_stored_as_json_text(backend: Backend) -> None:
    store = backend.make()
    results = Results(store)
    node = results.node(None)
    node(results.key({"plain": [1, "a"]}))
    node(results.key({"when": dt.date(2020, 1, 1), 7: Color.RED}))
    stored = sorted(row["result"] for row in backend.rows())
    color = f"{Color.__module__}:Color"
    assert stored == [
        'nk1:{"$nk":"dict","v":[["when",{"$nk":"date","v":"2020-01-01"}],'
        f'[7,{{"$nk":"enum","c":"{color}","v":"red"}}]]}}',
        '{"plain":[1,"a"]}',  # plain JSON is stored as it is
    ]


class Reversed:
    """A user codec (`Idempotency(codec=...)`): stored text is transformed, here reversed."""

    def encode(self, text: str) -> str:
        return text[::-1]

    def decode(self, text: str) -> str:
        return text[::-1]


def test_tagged_results_pass_through_the_codec(backend: Backend) -> None:
    results = Results(backend.make())
    policy = nk.Idempotency(key=lambda order: order, store=results.store, codec=Reversed())

    @nk.node(name="coded", idempotency=policy)
    def coded(order: str) -> Any:
        results.runs[order] += 1
        return results.given[order]

    replays_exactly(coded, results, {"amount": Decimal("1.50"), "at": EXAMPLES["datetime"]})
    (row,) = backend.rows()
    assert row["result"].endswith(":1kn")  # the tagged text, reversed
