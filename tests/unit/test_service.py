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


def test_duplicate_method_is_refused():
    svc = zrpc.Service("svc")
    svc.method(lambda: 1, name="x")
    with pytest.raises(ValueError, match="twice"):
        svc.method(lambda: 2, name="x")
