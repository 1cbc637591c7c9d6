import types

import zrpc


def test_all_is_sorted_and_complete():
    """Every public name is in __all__ (submodules such as zrpc.middleware are not names)."""
    public = sorted(n for n in dir(zrpc)
                    if not n.startswith("_") and not isinstance(getattr(zrpc, n), types.ModuleType))
    assert list(zrpc.__all__) == sorted(zrpc.__all__)
    assert public == list(zrpc.__all__)


def test_the_call_context_and_middleware_are_public():
    assert {"current_call", "CallContext", "Middleware"} <= set(zrpc.__all__)
    assert zrpc.current_call() is None  # outside a handler
    assert zrpc.current_call.__module__ == "zrpc" and zrpc.CallContext.__module__ == "zrpc"
    assert issubclass(zrpc.middleware.Timing, zrpc.Middleware)


def test_errors_share_one_base():
    for name in zrpc.__all__:
        obj = getattr(zrpc, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, zrpc.ZrpcError)
            assert obj.__module__ == "zrpc"


def test_the_documented_public_names_are_there():
    """DESIGN.md §1: the public contract, kept exactly (names may be added, none removed)."""
    documented = {"Service", "Client", "AsyncClient", "Worker", "ZrpcError", "RemoteError", "Timeout",
                  "ServiceUnavailable", "MethodNotFound", "Overloaded", "CallStateUnknown", "ProtocolError",
                  "Unauthorized"}
    assert documented <= set(zrpc.__all__)
    for name in documented:
        assert getattr(zrpc, name).__module__ == "zrpc"


def test_remote_error_keeps_what_the_handler_raised():
    e = zrpc.RemoteError("KeyError", "'x'", "Traceback...")
    assert (e.remote_type, e.message, e.remote_traceback) == ("KeyError", "'x'", "Traceback...")
    assert isinstance(e, zrpc.ZrpcError) and "KeyError" in str(e)
