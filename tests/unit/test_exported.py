import zrpc


def test_all_is_sorted_and_complete():
    public = sorted(n for n in dir(zrpc) if not n.startswith("_") and n[0].isupper())
    assert list(zrpc.__all__) == sorted(zrpc.__all__)
    assert public == list(zrpc.__all__)


def test_errors_share_one_base():
    for name in zrpc.__all__:
        obj = getattr(zrpc, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, zrpc.ZrpcError)
            assert obj.__module__ == "zrpc"
