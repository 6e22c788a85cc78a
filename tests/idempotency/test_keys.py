"""Canonical fingerprints: the same inputs give the same key in every process, forever."""

import dataclasses
import datetime as dt
import enum
import hashlib
import json
import subprocess
import sys
import uuid
from decimal import Decimal
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from pydantic import BaseModel

import nodekit as nk
from nodekit._canonical import digest
from nodekit.idempotency import MemoryStore, canonical_json, derive_key

# ---------------------------------------------------------------------------- canonical JSON


class Colour(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    ONE = 1


class Tone(enum.StrEnum):
    RED = "red"


@dataclasses.dataclass
class Address:
    street: str
    number: int


class Customer(BaseModel):
    email: str
    credit: Decimal


def test_one_one_point_zero_true_and_the_string_one_all_differ() -> None:
    texts = {canonical_json(v) for v in (1, 1.0, True, "1", Decimal("1"), Level.ONE)}
    assert len(texts) == 6


def test_enum_members_never_collide_with_their_plain_values() -> None:
    assert canonical_json(Tone.RED) != canonical_json("red")
    assert canonical_json(Colour.RED) != canonical_json("red")
    assert canonical_json(Colour.RED) != canonical_json(Tone.RED)
    assert canonical_json(Level.ONE) != canonical_json(1)


def test_dict_key_order_is_irrelevant() -> None:
    a = {"b": 1, "a": [1, {"y": 2, "x": 3}]}
    b = {"a": [1, {"x": 3, "y": 2}], "b": 1}
    assert canonical_json(a) == canonical_json(b)


def test_non_string_dict_keys_do_not_collide_with_string_keys() -> None:
    assert canonical_json({1: "x"}) != canonical_json({"1": "x"})
    assert canonical_json({1: "x", 2: "y"}) == canonical_json({2: "y", 1: "x"})


def test_sets_are_order_free_and_differ_from_lists() -> None:
    assert canonical_json({3, 1, 2}) == canonical_json({1, 2, 3})
    assert canonical_json({1, 2}) != canonical_json([1, 2])


def test_sequence_order_matters() -> None:
    assert canonical_json([1, 2]) != canonical_json([2, 1])


@pytest.mark.parametrize(
    ("value", "tag"),
    [
        (Decimal("9.90"), "$nk:decimal"),
        (uuid.UUID("12345678-1234-5678-1234-567812345678"), "$nk:uuid"),
        (dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC), "$nk:datetime"),
        (dt.date(2024, 5, 1), "$nk:date"),
        (Colour.RED, "$nk:enum"),
        (PurePosixPath("/srv/data/in.csv"), "$nk:path"),
        (b"\x00\xffbytes", "$nk:bytes"),
        (Address("Main St", 1), "$nk:dataclass"),
        (Customer(email="c@example.com", credit=Decimal("1.50")), "$nk:model"),
        (float("nan"), "$nk:float"),
    ],
)
def test_supported_types_encode_explicitly(value: Any, tag: str) -> None:
    text = canonical_json(value)
    assert tag in json.loads(text)
    assert canonical_json(value) == text  # deterministic


def test_equal_values_of_supported_types_encode_equally() -> None:
    assert canonical_json(Decimal("9.90")) != canonical_json(Decimal("9.9"))
    assert canonical_json(Path("a/b")) == canonical_json(PurePosixPath("a/b"))
    assert canonical_json(bytearray(b"ab")) == canonical_json(b"ab")
    assert canonical_json(Address("x", 1)) == canonical_json(Address("x", 1))
    assert canonical_json(Address("x", 1)) != canonical_json({"street": "x", "number": 1})
    paris = dt.timezone(dt.timedelta(hours=2))
    moment = dt.datetime(2024, 5, 1, 14, 0, tzinfo=paris)
    assert "+02:00" in canonical_json(moment)


def test_a_naive_datetime_is_a_type_error_without_its_value() -> None:
    with pytest.raises(TypeError, match="naive datetime") as info:
        canonical_json({"at": dt.datetime(2024, 5, 1, 12, 0)})
    assert "2024" not in str(info.value)


@pytest.mark.parametrize("value", [object(), lambda: 1, {1: object()}, [Path, 1], 1j])
def test_arbitrary_objects_are_a_type_error_never_a_repr(value: Any) -> None:
    with pytest.raises(TypeError, match="cannot fingerprint"):
        canonical_json(value)


def test_the_encoding_is_stable_across_processes() -> None:
    """A fresh interpreter (new hash seed) computes the same text and digest."""
    value = {"b": {3, 1, 2}, "a": [Decimal("1.10"), b"x"], 7: None}
    code = (
        "from decimal import Decimal; from nodekit.idempotency import canonical_json; "
        "print(canonical_json({'b': {3, 1, 2}, 'a': [Decimal('1.10'), b'x'], 7: None}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123"},
    )
    assert out.stdout.strip() == canonical_json(value)


# ---------------------------------------------------------------------------- digests


def test_digest_is_sha256_or_hmac_with_a_secret() -> None:
    text = canonical_json(["charge", "", "o-1"])
    assert digest(text) == hashlib.sha256(text.encode()).hexdigest()
    assert digest(text, b"s1") != digest(text) != digest(text, b"s2")
    assert len(digest(text, b"s1")) == 64


def test_derived_keys_are_stable_and_distinct_per_step() -> None:
    parent = digest("parent")
    assert derive_key(parent, "charge") == derive_key(parent, "charge")
    assert derive_key(parent, "charge") != derive_key(parent, "email")
    assert derive_key(parent, "charge") != derive_key(digest("other"), "charge")


# ---------------------------------------------------------------------------- node keys


def _plan(**options: Any) -> Any:
    @nk.node(name="charge", idempotency=nk.Idempotency(store=MemoryStore(), **options))
    def charge(order: Any, amount: Any = 0, *, db: Any = nk.resource()) -> None:
        return None

    return charge.spec.idempotency


def test_node_keys_of_1_1_0_true_and_the_string_1_differ() -> None:
    plan = _plan()
    digests = {plan.key_for((v,), {})[0].digest for v in (1, 1.0, True, "1")}
    assert len(digests) == 4


def test_the_default_key_covers_all_bound_arguments_but_resources() -> None:
    plan = _plan()
    positional = plan.key_for(("o-1", 5), {"db": object()})
    keywords = plan.key_for((), {"amount": 5, "order": "o-1", "db": "another connection"})
    assert positional == keywords
    assert plan.key_for(("o-1",), {}) == plan.key_for(("o-1", 0), {})  # defaults applied
    assert plan.key_for(("o-1", 6), {})[0] != positional[0]


def test_fields_limit_the_payload_fingerprint() -> None:
    plan = _plan(key=lambda order: order, fields=["order"])
    assert plan.key_for(("o-1", 5), {}) == plan.key_for(("o-1", 6), {})
    plan = _plan(key=lambda order: order)
    assert plan.key_for(("o-1", 5), {})[1] != plan.key_for(("o-1", 6), {})[1]


def test_a_secret_changes_every_digest() -> None:
    plain = _plan(key=lambda order: order).key_for(("o-1",), {})
    secret = _plan(key=lambda order: order, secret="s3cret").key_for(("o-1",), {})
    assert plain[0].digest != secret[0].digest
    assert plain[1] != secret[1]


def test_an_unsupported_argument_is_a_config_error_naming_the_node() -> None:
    plan = _plan()
    with pytest.raises(nk.ConfigError, match=r"'charge'.*cannot fingerprint"):
        plan.key_for((object(),), {})
    with pytest.raises(nk.ConfigError, match="naive datetime"):
        plan.key_for((dt.datetime(2024, 1, 1),), {})


def test_a_key_function_naming_an_unknown_parameter_is_a_config_error() -> None:
    with pytest.raises(nk.ConfigError, match="customer"):
        _plan(key=lambda customer: customer)
