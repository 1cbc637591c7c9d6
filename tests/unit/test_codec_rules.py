"""Codec rules: what is answerable gets an answer, what is bounded stays bounded."""

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zrpc._core._frames import (
    CLIENT,
    MAX_BUDGET_MS,
    MAX_METHODS,
    MAX_SERVICES,
    WORKER,
    ClientRequest,
    Ready,
    WorkerReply,
    decode,
)
from zrpc._errors import ProtocolError


def pk(obj):
    return msgpack.packb(obj, use_bin_type=True)


def reply_to(head):
    with pytest.raises(ProtocolError) as info:
        decode(head, b"")
    return info.value.reply_to


# --- once the request id is readable, the request can be answered -------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        [],  # no service, method or headers
        ["calc"],
        ["calc", "add"],  # no headers
        [5, "add", {}],
        ["calc", None, {}],
        ["calc", "add", []],
        ["calc", "add", {b"budget_ms": 5}],  # a bin key
        ["calc", "add", {"budget_ms": 5, b"x": 1}],
        ["calc", "add", {"budget_ms": -1}],
        ["calc", "add", {"budget_ms": MAX_BUDGET_MS + 1}],
        ["calc", "add", {"budget_ms": 2**40}],
        ["calc", "add", {"idempotent": "yes"}],
        ["calc", "add", {"attempt": 10**6}],
        ["x" * 300, "add", {}],
    ],
)
def test_request_with_a_readable_id_is_answerable(fields):
    assert reply_to(pk([CLIENT, 1, 77, *fields])) == 77


def test_non_string_header_keys_are_answerable():
    # msgpack refuses int or nil map keys at once; the request id was still readable
    for key in (1, None, 1.5, True):
        head = b"".join([b"\x96", pk(CLIENT), pk(1), pk(77), pk("calc"), pk("add"),
                         b"\x81", pk(key), pk(1)])
        assert reply_to(head) == 77, key


def test_request_whose_head_breaks_after_the_id_is_answerable():
    good = pk([CLIENT, 1, 77, "calc", "add", {"budget_ms": 5}])
    assert reply_to(good[:-1]) == 77  # truncated
    assert reply_to(good + b"\xc0") == 77  # trailing bytes
    deep = b"\x96" + pk(CLIENT) + pk(1) + pk(77) + pk("calc") + pk("add") + b"\x91" * 60_000
    assert reply_to(deep) == 77  # nested past msgpack's limits


def test_unreadable_request_id_cannot_be_answered():
    assert reply_to(pk([CLIENT, 1])) is None
    assert reply_to(pk([CLIENT, 1, -1, "calc", "add", {}])) is None
    assert reply_to(pk([CLIENT, 1, "7", "calc", "add", {}])) is None
    assert reply_to(pk([CLIENT, 1, 7.0, "calc", "add", {}])) is None
    assert reply_to(pk([CLIENT, True, 7, "calc", "add", {}])) is None
    assert reply_to(b"\x96" + pk(CLIENT) + pk(1)) is None  # truncated before the id


def test_budget_is_capped_at_a_day():
    ok = decode(pk([CLIENT, 1, 1, "calc", "add", {"budget_ms": MAX_BUDGET_MS}]))
    assert isinstance(ok, ClientRequest) and MAX_BUDGET_MS == 86_400_000


@settings(max_examples=300)
@given(st.integers(0, 2**64 - 1),
       st.lists(st.recursive(
           st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=6)
           | st.binary(max_size=6),
           lambda inner: st.lists(inner, max_size=3)
           | st.dictionaries(st.text(max_size=4) | st.binary(max_size=3), inner, max_size=3),
           max_leaves=8), max_size=5))
def test_any_request_with_a_valid_id_decodes_or_carries_reply_to(rid, fields):
    head = pk([CLIENT, 1, rid, *fields])
    try:
        msg = decode(head, b"")
    except ProtocolError as exc:
        assert exc.reply_to == rid
    else:
        assert isinstance(msg, ClientRequest) and msg.request_id == rid
        assert all(type(k) is str for k in msg.headers)


# --- worker replies: any status byte reaches the broker --------------------------------------------


@pytest.mark.parametrize("status", [0, 10, 11, 42, 255])
def test_worker_reply_takes_any_status_byte(status):
    msg = decode(pk([WORKER, 2, b"c", 1, status]), b"x")
    assert msg == WorkerReply(b"c", 1, status, b"x")


@pytest.mark.parametrize("status", [-1, 256, "0", None, 1.0, True])
def test_worker_reply_status_must_be_a_byte(status):
    with pytest.raises(ProtocolError, match="status"):
        decode(pk([WORKER, 2, b"c", 1, status]))


# --- READY is bounded ------------------------------------------------------------------------------


def test_ready_services_are_bounded():
    many = {f"s{i}": {"m": True} for i in range(MAX_SERVICES)}
    assert isinstance(decode(pk([WORKER, 3, "w", many, 8])), Ready)
    many["one-more"] = {"m": True}
    with pytest.raises(ProtocolError, match="services"):
        decode(pk([WORKER, 3, "w", many, 8]))
    assert MAX_SERVICES == 100


def test_ready_methods_are_bounded():
    methods = {f"m{i}": True for i in range(MAX_METHODS)}
    assert isinstance(decode(pk([WORKER, 3, "w", {"s": methods}, 8])), Ready)
    methods["one-more"] = False
    with pytest.raises(ProtocolError, match="methods"):
        decode(pk([WORKER, 3, "w", {"s": methods}, 8]))
    assert MAX_METHODS == 1000


def test_command_must_be_an_integer():
    with pytest.raises(ProtocolError, match="command"):
        decode(pk([CLIENT, True, 1, "calc", "add", {}]))


def test_any_map_key_in_an_ignored_trailing_field_is_fine():
    assert decode(pk([WORKER, 5, {1: "x", None: 2}])) is not None
    head = pk([CLIENT, 4, {"interval_ms": 250}, {7: [1]}])
    assert decode(head).info == {"interval_ms": 250}


def test_map_keys_no_dict_can_hold_are_a_protocol_error():
    head = b"\x93" + pk(WORKER) + pk(5) + b"\x81\x91\x01\x02"  # {[1]: 2}
    with pytest.raises(ProtocolError):
        decode(head)
