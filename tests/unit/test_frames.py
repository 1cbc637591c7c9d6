"""The ZRPC/1 codec: every message round-trips; any malformed input raises ProtocolError only.

The decoder is checked against an oracle written from docs/protocol.md (not from the code):
what the spec says a receiver must accept is accepted, what it must refuse is refused, and a
message that is accepted says exactly what the head said.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zrpc._core._frames import (
    CLIENT,
    MAX_HEAD,
    READERS,
    WORKER,
    WRITERS,
    ClientReply,
    ClientRequest,
    Command,
    Disconnect,
    Heartbeat,
    Message,
    Ready,
    Status,
    WorkerReply,
    WorkerRequest,
    decode,
    decode_frames,
    encode,
)
from zrpc._errors import ProtocolError

ids = st.binary(min_size=1, max_size=32)
rids = st.integers(min_value=0, max_value=2**64 - 1)
names = st.text(min_size=1, max_size=40)
headers = st.fixed_dictionaries(
    {}, optional={"budget_ms": st.integers(0, 3_600_000), "idempotent": st.booleans(),
                  "attempt": st.integers(0, 10), "trace_id": st.text(max_size=20)})
statuses = st.sampled_from(list(Status))
bodies = st.binary(max_size=200)

messages = st.one_of(
    st.builds(ClientRequest, rids, names, names, headers, bodies),
    st.builds(ClientReply, rids, statuses, bodies),
    st.builds(WorkerRequest, ids, rids, names, names, headers, bodies),
    st.builds(WorkerReply, ids, rids, statuses, bodies),
    st.builds(Ready, names, st.dictionaries(names, st.dictionaries(names, st.booleans(), max_size=3),
                                            min_size=1, max_size=3),
              st.integers(1, 1000), st.floats(0.01, 100), st.just({"pid": 1})),
    st.builds(Heartbeat, st.sampled_from([CLIENT, WORKER]), st.just({"interval_ms": 250})),
    st.just(Disconnect()),
)

json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)


EDGES: list[Any] = [
    0, 1, -1, 3, 4, 255, 256, 100_000, 100_001, 3_600_000, 10**9, 2**40 + 1, 2**64 - 1, 0.0, -0.0, 1.5, -2.5, 1e300,
    float("inf"), float("-inf"), True, False, None, "", "x" * 256, "x" * 257, b"", b"c" * 255, b"c" * 256,
    [], {}, {"calc": {}}, {"calc": {"add": 1}}, {1: {"add": True}}, ["ZRPC1C"], CLIENT, WORKER,
]
"""Values at the edges the spec draws (sizes, ranges, types), which random data rarely hits."""
edges = st.sampled_from(EDGES)
corrupt = st.one_of(edges, json_like)


def unpack(head: bytes) -> Any:
    return msgpack.unpackb(head, raw=False, strict_map_key=False)


# --- an oracle from docs/protocol.md ----------------------------------------------------------
# Each rule answers True (the spec says a receiver accepts it), False (the spec says it is a
# protocol error) or None (the spec leaves it open: either answer is right).

def _all(verdicts: list[bool | None]) -> bool | None:
    if False in verdicts:
        return False
    return None if None in verdicts else True


def _uint(v: Any, bits: int = 64) -> bool:
    return type(v) is int and 0 <= v < 2**bits


def _name(v: Any) -> bool | None:  # §3: strings, at most 256 characters
    if type(v) is not str or len(v) > 256:
        return False
    return True if v else None  # the empty name is not spelled out


def _client_id(v: Any) -> bool:  # §3: bytes (1..255)
    return type(v) is bytes and 1 <= len(v) <= 255


def _status(v: Any) -> bool:  # §5: the table, 0..10
    return type(v) is int and 0 <= v <= 10


def _worker_status(v: Any) -> bool | None:
    """A worker's status outside the table is still a reply its client must get an answer
    for: the codec may pass it on for the broker to answer, or refuse it."""
    if type(v) is not int:
        return False
    return True if 0 <= v <= 10 else None


def _map(v: Any) -> bool | None:  # info: a map (its keys' type is not spelled out)
    if type(v) is not dict:
        return False
    return True if all(type(k) is str for k in v) else None


def _headers(v: Any) -> bool | None:  # §4
    if type(v) is not dict:
        return False
    out: list[bool | None] = []
    for k, x in v.items():
        if type(k) is not str or x is None:
            out.append(None)  # a non-string key, or nil for a known key: not spelled out
        elif k == "budget_ms":
            out.append(None if _uint(x) and x > 3_600_000 else _uint(x))  # an hour: surely allowed
        elif k in ("idempotent", "resent", "probe"):
            out.append(type(x) is bool)
        elif k == "attempt":
            out.append(None if _uint(x) and x > 3 else _uint(x))
        elif k == "trace_id":
            out.append(None if type(x) is not str else True)
    return _all(out)


def _services(v: Any) -> bool | None:  # §3: service -> {method -> idempotent (bool)}
    if type(v) is not dict:
        return False
    if not v or len(v) > 16:
        return None  # how many services one READY may hold is a broker's bound
    out: list[bool | None] = []
    for name, methods in v.items():
        out.append(_name(name))
        if type(methods) is not dict:
            out.append(False)
            continue
        if not methods:
            out.append(None)
        for m, idem in methods.items():
            out += [_name(m), type(idem) is bool]
    return _all(out)


def _capacity(v: Any) -> bool:  # §3: 1..100000
    return type(v) is int and 1 <= v <= 100_000


def _weight(v: Any) -> bool | None:  # §3: a positive number
    if type(v) not in (int, float):
        return False
    if not v > 0:
        return False
    return True if v <= 1000 else None


Rule = Callable[[Any], "bool | None"]
# (tag, command) -> (required field rules, optional trailing field rules)
LAYOUT: dict[tuple[str, int], tuple[list[Rule], list[Rule]]] = {
    (CLIENT, 1): ([_uint, _name, _name, _headers], []),
    (CLIENT, 2): ([_uint, _status], []),
    (CLIENT, 4): ([], [_map]),
    (WORKER, 1): ([_client_id, _uint, _name, _name, _headers], []),
    (WORKER, 2): ([_client_id, _uint, _worker_status], []),
    (WORKER, 3): ([_name, _services, _capacity], [_weight, _map]),
    (WORKER, 4): ([], [_map]),
    (WORKER, 5): ([], []),
}


def spec_verdict(fields: Any) -> bool | None:
    """Whether docs/protocol.md says a head holding `fields` is a valid message."""
    if type(fields) is not list or len(fields) < 2:
        return False
    if type(fields[0]) is not str or type(fields[1]) is not int or (fields[0], fields[1]) not in LAYOUT:
        return False  # §2: protocol is a string, command an integer (msgpack true is not 1)
    required, optional = LAYOUT[(fields[0], fields[1])]
    rest = fields[2:]
    if len(rest) < len(required):
        return False
    rules = required + optional
    return _all([rule(v) for rule, v in zip(rules, rest)])  # extra trailing fields are ignored


def assert_faithful(fields: list[Any], body: bytes, msg: Any) -> None:
    """An accepted message says what the head said: re-encoded, it gives back the same fields
    (up to ignored extras; defaults where optional fields were missing) and the same body."""
    frames = encode(msg)
    out = unpack(frames[0])
    n = min(len(out), len(fields))
    assert out[:n] == fields[:n], (fields, msg)
    defaults = {(WORKER, 3): [None, None, None, None, None, 1.0, {}], (CLIENT, 4): [None, None, {}],
                (WORKER, 4): [None, None, {}]}.get((fields[0], fields[1]))
    for i in range(n, len(out)):
        assert defaults is not None and out[i] == defaults[i], (fields, msg)
    if type(msg) in (ClientRequest, ClientReply, WorkerRequest, WorkerReply):
        assert msg.body == body


def check_against_spec(fields: list[Any], body: bytes = b"") -> None:
    head = msgpack.packb(fields, use_bin_type=True)
    verdict = spec_verdict(fields)
    try:
        msg = decode(head, body)
    except ProtocolError:
        assert verdict is not True, f"refused a head the spec accepts: {fields!r}"
        return
    assert verdict is not False, f"accepted a head the spec refuses: {fields!r} -> {msg!r}"
    assert_faithful(fields, body, msg)


def test_the_oracle_agrees_with_the_spec_examples():
    """The oracle itself can be wrong: pin it on hand-written heads."""
    assert spec_verdict([CLIENT, 1, 5, "calc", "add", {"budget_ms": 100}]) is True
    assert spec_verdict([CLIENT, 1, 5, "calc", "add", {"budget_ms": 100}, "extra"]) is True
    assert spec_verdict([CLIENT, 1, 5, "calc", "add"]) is False
    assert spec_verdict([CLIENT, 1, 5, 7, "add", {}]) is False
    assert spec_verdict([WORKER, 2, "c", 1, 0]) is False
    assert spec_verdict([WORKER, 3, "w", {"calc": {"add": True}}, 8]) is True
    assert spec_verdict([WORKER, 3, "w", {"calc": {"add": True}}, 8, -1.0]) is False
    assert spec_verdict(["ZRPC9X", 1]) is False
    assert spec_verdict([CLIENT, 3]) is False
    assert spec_verdict([WORKER, 5]) is True


# --- round trips and the wire layout ------------------------------------------------------------


WIRE = [  # docs/protocol.md §3, one of each message
        (ClientRequest(7, "calc", "add", {"budget_ms": 100}, b"args"),
         ["ZRPC1C", 1, 7, "calc", "add", {"budget_ms": 100}], b"args"),
        (ClientReply(7, Status.OK, b"res"), ["ZRPC1C", 2, 7, 0], b"res"),
        (WorkerRequest(b"\x01cid", 7, "calc", "add", {}, b"args"),
         ["ZRPC1W", 1, b"\x01cid", 7, "calc", "add", {}], b"args"),
        (WorkerReply(b"\x01cid", 7, Status.ERROR, b"err"), ["ZRPC1W", 2, b"\x01cid", 7, 1], b"err"),
        (Ready("w1", {"calc": {"add": True, "charge": False}}, 8, 2.0, {"pid": 1}),
         ["ZRPC1W", 3, "w1", {"calc": {"add": True, "charge": False}}, 8, 2.0, {"pid": 1}], b""),
        (Heartbeat(CLIENT, {"interval_ms": 250}), ["ZRPC1C", 4, {"interval_ms": 250}], b""),
        (Heartbeat(WORKER, {}), ["ZRPC1W", 4, {}], b""),
        (Disconnect(), ["ZRPC1W", 5], b""),
]


@given(messages)
def test_every_message_round_trips(msg):
    frames = encode(msg)
    assert len(frames) == 2
    assert decode_frames(frames) == msg


@pytest.mark.parametrize("msg, head, body", WIRE)
def test_wire_layout_is_the_one_in_the_spec(msg, head, body):
    """A round trip cannot see a field order or a tag both sides get wrong; the spec's table can
    (docs/protocol.md §3): exact fields, str vs bin, and both directions."""
    frames = encode(msg)
    assert len(frames) == 2 and frames[1] == body
    assert msgpack.unpackb(frames[0], raw=True) == msgpack.unpackb(msgpack.packb(head, use_bin_type=True), raw=True)
    assert decode(msgpack.packb(head, use_bin_type=True), body) == msg


def test_status_and_command_numbers_are_the_spec_tables():
    assert {s.name: int(s) for s in Status} == {
        "OK": 0, "ERROR": 1, "TIMEOUT": 2, "SERVICE_UNAVAILABLE": 3, "METHOD_NOT_FOUND": 4,
        "OVERLOADED": 5, "CALL_STATE_UNKNOWN": 6, "PROTOCOL_ERROR": 7, "NOT_ACTIVE": 8,
        "UNAUTHORIZED": 9, "NOT_SEEN": 10}
    assert (CLIENT, WORKER) == ("ZRPC1C", "ZRPC1W")


def _spec_commands() -> dict[str, set[int]]:
    """The command table of docs/protocol.md §2: dialect tag -> the commands it has."""
    spec = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    spec = spec[spec.index("\n## 2."):spec.index("\n## 3.")]
    out: dict[str, set[int]] = {CLIENT: set(), WORKER: set()}
    for value, _, client, worker in re.findall(r"^\|\s*(\d+)\s*\|\s*([A-Z]+)\s*\|([^|]*)\|([^|]*)\|$", spec, re.M):
        for tag, cell in ((CLIENT, client), (WORKER, worker)):
            if cell.strip() != "—":
                out[tag].add(int(value))
    return out


def test_the_decode_table_is_the_spec_command_table():
    """READERS is the message list of docs/protocol.md: each dialect has exactly its commands."""
    assert {tag: set(commands) for tag, commands in READERS.items()} == _spec_commands()
    assert {tag: set(commands) for tag, commands in READERS.items()} == {
        CLIENT: {Command.REQUEST, Command.REPLY, Command.HEARTBEAT}, WORKER: set(Command)}


def test_every_message_class_has_a_writer():
    assert set(WRITERS) == set(get_args(Message))
    with pytest.raises(TypeError, match="not a ZRPC/1 message"):
        encode(object())  # a bug of the sender, not a protocol error


@pytest.mark.parametrize("tag", [["ZRPC1C"], {"ZRPC1C": 1}, b"ZRPC1C", None, 1, 1.5, "ZRPC1S", ""])
def test_a_tag_that_is_no_dialect_is_refused_whatever_its_type(tag):
    with pytest.raises(ProtocolError, match="unknown protocol tag"):
        decode(msgpack.packb([tag, 4, {}], use_bin_type=True))


@pytest.mark.parametrize("tag, cmd", [(CLIENT, 3), (CLIENT, 5), (CLIENT, 0), (WORKER, 6), (WORKER, -1),
                                      (WORKER, 2**64 - 1)])
def test_a_command_the_dialect_lacks_is_refused(tag, cmd):
    with pytest.raises(ProtocolError, match=f"unknown command {cmd} for {tag}"):
        decode(msgpack.packb([tag, cmd], use_bin_type=True))


@settings(max_examples=300)
@given(messages, st.lists(json_like, min_size=1, max_size=3))
def test_extra_trailing_head_fields_are_ignored(msg, extra):
    """§2: a receiver MUST ignore extra trailing head fields (how fields are added)."""
    frames = encode(msg)
    fields = unpack(frames[0])
    full = {Ready: 7, Heartbeat: 3}.get(type(msg), len(fields))
    fields = fields[:full] + extra
    assert decode(msgpack.packb(fields, use_bin_type=True), frames[1]) == msg


# --- malformed input ------------------------------------------------------------------------------


@settings(max_examples=500)
@given(st.binary(max_size=300), st.binary(max_size=50))
def test_arbitrary_bytes_raise_only_protocol_error(head, body):
    """Garbage is refused with ProtocolError and nothing else; bytes that happen to be a valid
    head decode to exactly what they say (the decoder invents nothing)."""
    try:
        fields = msgpack.unpackb(head, raw=False, strict_map_key=True)
    except Exception:
        fields = None
    try:
        msg = decode(head, body)
    except ProtocolError:
        assert fields is None or spec_verdict(fields) is not True, fields
        return
    assert fields is not None, f"{head!r} is not msgpack, yet decoded to {msg!r}"
    assert spec_verdict(fields) is not False, f"{fields!r} decoded to {msg!r}"
    assert_faithful(fields, body, msg)


@settings(max_examples=500)
@given(st.sampled_from([CLIENT, WORKER, "ZRPC9X", 7]), st.integers(-2, 9), st.lists(corrupt, max_size=8))
def test_wrong_fields_raise_only_protocol_error(tag, cmd, fields):
    check_against_spec([tag, cmd, *fields])


@settings(max_examples=1000)
@given(messages, st.data())
def test_one_corrupted_field_is_refused_unless_the_spec_allows_it(msg, data):
    """Each field of a valid message replaced by an arbitrary value: accepted exactly when the
    spec allows the new value there (a wrong type, range or tag is a protocol error)."""
    frames = encode(msg)
    fields = unpack(frames[0])
    i = data.draw(st.integers(0, len(fields) - 1), label="field")
    fields[i] = data.draw(corrupt, label="value")
    check_against_spec(fields, frames[1])


@pytest.mark.parametrize("msg, head, body", WIRE)
def test_every_field_at_every_edge_value(msg, head, body):
    """Deterministic: each field of each message set to each edge value, checked against the
    spec (random draws rarely reach a given field with a given edge)."""
    for i in range(len(head)):
        for value in EDGES:
            fields = list(head)
            fields[i] = value
            check_against_spec(fields, body)


@settings(max_examples=500)
@given(st.sampled_from([(CLIENT, 5), (WORKER, 6)]), st.sampled_from(
    ["budget_ms", "idempotent", "attempt", "trace_id", "resent", "probe"]), corrupt)
def test_a_known_header_with_a_wrong_value_is_refused(where, key, value):
    """§4: each header the spec names has a type; a request carrying another is refused (and
    unknown header keys are carried along)."""
    tag, at = where
    fields: list[Any] = [tag, 1, 9, "calc", "add", {}] if tag == CLIENT else [tag, 1, b"cid", 9, "calc", "add", {}]
    fields[at] = {key: value, "x-unknown": [1, "two"]}
    check_against_spec(fields, b"body")


@pytest.mark.parametrize("drop", [1, 2])
@given(msg=messages)
def test_a_missing_required_field_is_refused(drop, msg):
    frames = encode(msg)
    fields = unpack(frames[0])
    required = 2 + len(LAYOUT[(fields[0], fields[1])][0])
    if required - drop < 2:
        return  # nothing required to drop
    with pytest.raises(ProtocolError):
        decode(msgpack.packb(fields[: required - drop], use_bin_type=True), frames[1])


@pytest.mark.parametrize(
    "head, why",
    [
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb({"a": 1}), "must be an array"),
        (msgpack.packb(["MDPC01", 1]), "unknown protocol tag"),
        (msgpack.packb([CLIENT, 99]), "unknown command"),
        (msgpack.packb([CLIENT, 1, 5, "calc"]), "needs 6 head fields"),
        (msgpack.packb([CLIENT, 1, -1, "calc", "add", {}]), "request_id"),
        (msgpack.packb([WORKER, 3, "w", {}, 8]), "services"),
        (msgpack.packb([WORKER, 3, "w", {"calc": {"add": True}}, 0]), "capacity"),
        (msgpack.packb([CLIENT, 2, 1, 42]), "unknown status"),
        (b"\x91" + b"\xa1x" * 10, "ExtraData"),
    ],
)
def test_malformed_heads_say_why(head, why):
    with pytest.raises(ProtocolError, match=why):
        decode(head, b"")


def test_bad_header_in_a_request_can_still_be_answered():
    head = msgpack.packb([CLIENT, 1, 77, "calc", "add", {"budget_ms": "soon"}])
    with pytest.raises(ProtocolError) as info:
        decode(head)
    assert info.value.reply_to == 77


def _padded_heartbeat(size: int) -> bytes:
    """A valid heartbeat head of exactly `size` bytes."""
    base = len(msgpack.packb([CLIENT, 4, {"pad": ""}], use_bin_type=True))
    for pad in range(max(0, size - base - 8), size):
        head = msgpack.packb([CLIENT, 4, {"pad": "x" * pad}], use_bin_type=True)
        if len(head) == size:
            return head
    raise AssertionError(f"no heartbeat of {size} bytes")


def test_oversized_head_is_refused_before_parsing():
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(b"\x00" * (MAX_HEAD + 1))
    # well-formed but one byte too large is refused for its size; the largest allowed is read
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(_padded_heartbeat(MAX_HEAD + 1))
    assert type(decode(_padded_heartbeat(MAX_HEAD))) is Heartbeat


def test_wrong_frame_count():
    with pytest.raises(ProtocolError, match="2 frames"):
        decode_frames([b"a", b"b", b"c"])
    with pytest.raises(ProtocolError, match="2 frames"):
        decode_frames([])


def test_deep_nesting_is_a_protocol_error():
    """A complete, well-formed head whose only fault is its depth (inside a heartbeat's info
    map, where any value would do) is refused, not a crash or a RecursionError."""
    head = b"\x93" + msgpack.packb(CLIENT) + b"\x04" + b"\x81\xa1x" + b"\x91" * 50_000 + b"\xc0"
    assert len(head) <= MAX_HEAD
    with pytest.raises(ProtocolError):
        decode(head)
    shallow = b"\x93" + msgpack.packb(CLIENT) + b"\x04" + b"\x81\xa1x" + b"\x91" * 10 + b"\xc0"
    assert type(decode(shallow)) is Heartbeat  # the same shape, not deep, is fine
