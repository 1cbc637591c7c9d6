import pytest

import zrpc
from zrpc._core._frames import Status
from zrpc._core._serial import outcome, pack_call, pack_error, pack_result, unpack_call


def test_call_round_trip():
    assert unpack_call(pack_call((1, "a", b"b"), {"k": [1, 2]})) == ([1, "a", b"b"], {"k": [1, 2]})


def test_unserializable_arguments_fail_at_the_caller():
    with pytest.raises(TypeError, match="msgpack"):
        pack_call((object(),), {})


@pytest.mark.parametrize("body", [b"\xc1", pack_result(3), pack_result([1]), pack_result([[], {1: 2}])])
def test_bad_call_bodies_are_protocol_errors(body):
    with pytest.raises(zrpc.ProtocolError):
        unpack_call(body)


@pytest.mark.parametrize(
    "status, exc",
    [
        (Status.TIMEOUT, zrpc.Timeout),
        (Status.SERVICE_UNAVAILABLE, zrpc.ServiceUnavailable),
        (Status.METHOD_NOT_FOUND, zrpc.MethodNotFound),
        (Status.OVERLOADED, zrpc.Overloaded),
        (Status.CALL_STATE_UNKNOWN, zrpc.CallStateUnknown),
        (Status.PROTOCOL_ERROR, zrpc.ProtocolError),
        (Status.UNAUTHORIZED, zrpc.Unauthorized),
    ],
)
def test_status_maps_to_its_exception(status, exc):
    with pytest.raises(exc, match="why"):
        outcome(status, pack_error(exc.__name__, "why"))


def test_remote_error_carries_type_message_traceback():
    with pytest.raises(zrpc.RemoteError) as info:
        outcome(Status.ERROR, pack_error("KeyError", "'x'", "Traceback..."))
    assert (info.value.remote_type, info.value.message, info.value.remote_traceback) == (
        "KeyError", "'x'", "Traceback...")


def test_ok_result_and_garbage_error_body():
    assert outcome(Status.OK, pack_result({"a": 1})) == {"a": 1}
    assert outcome(Status.OK, pack_result(None)) is None
    with pytest.raises(zrpc.RemoteError, match="undecodable"):
        outcome(Status.ERROR, b"\xc1")


@pytest.mark.parametrize("body", [b"\xc1", b"", pack_result([1, 2])[:-1]])
def test_garbage_ok_body_is_a_protocol_error_not_a_result(body):
    """An OK reply whose body does not decode must not pass for a result (None, say)."""
    with pytest.raises(zrpc.ProtocolError):
        outcome(Status.OK, body)


def test_results_keep_str_bytes_and_nesting_apart():
    value = {"s": "text", "b": b"\x00bin", "n": [1, [2.5, None, True]], "i": -(2**63)}
    assert outcome(Status.OK, pack_result(value)) == value
    assert type(outcome(Status.OK, pack_result("x"))) is str and type(outcome(Status.OK, pack_result(b"x"))) is bytes


def test_an_unknown_status_is_still_an_error():
    with pytest.raises(zrpc.ZrpcError, match="odd"):
        outcome(200, pack_error("Odd", "odd"))
