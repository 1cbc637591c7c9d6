import pytest

import zrpc


def test_decorators_register_sync_and_async_with_idempotency():
    svc = zrpc.Service("svc")

    @svc.method
    def a(x):
        return x

    @svc.method(idempotent=False)
    def b():
        pass

    @svc.method(name="c2")
    async def c():
        pass

    assert a(3) == 3  # the function stays callable locally
    assert svc.spec() == {"a": True, "b": False, "c2": True}
    assert svc.get("c2").is_async and not svc.get("a").is_async


@pytest.mark.parametrize("name", ["", "zrpc", "zrpc.x", "has space", "9x", None])
def test_bad_or_reserved_service_names(name):
    with pytest.raises(ValueError):
        zrpc.Service(name)


@pytest.mark.parametrize("name", ["", "has space", "9x", "a.b", "x" * 129])
def test_bad_method_names_are_refused(name):
    svc = zrpc.Service("svc")
    with pytest.raises(ValueError, match="method name"):
        svc.method(lambda: 1, name=name)


@pytest.mark.parametrize("name", ["calc", "my-svc.v2", "_x", "a" * 128])
def test_good_service_names_are_accepted(name):
    assert zrpc.Service(name).name == name


def test_methods_view_is_a_copy():
    svc = zrpc.Service("svc")
    svc.method(lambda: 1, name="x")
    svc.methods.clear()  # type: ignore[attr-defined]
    assert svc.get("x") is not None and svc.get("nope") is None


def test_duplicate_method_is_refused():
    svc = zrpc.Service("svc")
    svc.method(lambda: 1, name="x")
    with pytest.raises(ValueError, match="twice"):
        svc.method(lambda: 2, name="x")


def test_a_worker_beyond_the_protocols_limits_is_refused_at_once():
    """Brokers drop a READY of more than 100 services: better an error now than silence."""
    import zrpc

    services = []
    for i in range(101):
        svc = zrpc.Service(f"s{i}")
        svc.method(lambda: None, name="f")
        services.append(svc)
    with pytest.raises(ValueError, match="at most 100 services"):
        zrpc.Worker(services, brokers="tcp://127.0.0.1:1")
    zrpc.Worker(services[:100], brokers="tcp://127.0.0.1:1")  # the limit itself is fine


KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"  # a Z85 public key (the zguide's example)


def test_allow_keeps_the_caller_keys_and_ready_does_not_carry_them():
    svc = zrpc.Service("svc")
    svc.method(lambda: 1, name="a", allow=[KEY])
    svc.method(lambda: 1, name="b", allow=KEY)  # one key on its own will do
    svc.method(lambda: 1, name="c")
    assert svc.get("a").allow == svc.get("b").allow == frozenset({KEY})
    assert svc.get("c").allow is None
    assert svc.spec() == {"a": True, "b": True, "c": True}


@pytest.mark.parametrize("allow, match", [
    ([], "names no caller"),
    (["short"], "is not a CURVE public key"),
    ([KEY[:-1] + " "], "is not a CURVE public key"),
    ([KEY.encode()], "is not a CURVE public key"),
    ([KEY, None], "is not a CURVE public key"),
])
def test_allow_refuses_what_is_not_a_list_of_keys_at_decoration(allow, match):
    svc = zrpc.Service("svc")
    with pytest.raises(ValueError, match=match):
        svc.method(lambda: 1, name="a", allow=allow)
    assert svc.get("a") is None
