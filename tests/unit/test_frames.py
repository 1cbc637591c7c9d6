"""The ZRPC/1 codec: every message round-trips; any malformed input raises ProtocolError only."""

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zrpc._errors import ProtocolError
from zrpc._frames import (
    CLIENT,
    MAX_HEAD,
    WORKER,
    ClientReply,
    ClientRequest,
    Disconnect,
    Heartbeat,
    Ready,
    Status,
    WorkerReply,
    WorkerRequest,
    decode,
    decode_frames,
    encode,
)

ids = st.binary(min_size=1, max_size=32)
rids = st.integers(min_value=0, max_value=2**64 - 1)
names = st.text(min_size=1, max_size=40)
headers = st.fixed_dictionaries(
    {}, optional={"budget_ms": st.integers(0, 10**9), "idempotent": st.booleans(),
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


@given(messages)
def test_every_message_round_trips(msg):
    frames = encode(msg)
    assert len(frames) == 2
    assert decode_frames(frames) == msg


@settings(max_examples=500)
@given(st.binary(max_size=300), st.binary(max_size=50))
def test_arbitrary_bytes_raise_only_protocol_error(head, body):
    try:
        decode(head, body)
    except ProtocolError:
        pass


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=500)
@given(st.sampled_from([CLIENT, WORKER, "ZRPC9X", 7]), st.integers(-2, 9), st.lists(json_like, max_size=8))
def test_wrong_fields_raise_only_protocol_error(tag, cmd, fields):
    head = msgpack.packb([tag, cmd, *fields], use_bin_type=True)
    try:
        decode(head, b"")
    except ProtocolError:
        pass


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
        (msgpack.packb([WORKER, 2, b"c", 1, 42]), "unknown status"),
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


def test_oversized_head_is_refused_before_parsing():
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(b"\x00" * (MAX_HEAD + 1))


def test_wrong_frame_count():
    with pytest.raises(ProtocolError, match="2 frames"):
        decode_frames([b"a", b"b", b"c"])
    with pytest.raises(ProtocolError, match="2 frames"):
        decode_frames([])


def test_deep_nesting_is_a_protocol_error():
    head = b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(ProtocolError):
        decode(head[:MAX_HEAD])
