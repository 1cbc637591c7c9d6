"""A sync client: `python examples/client.py` with a pair and a calc worker running
(`zrpc pair &` and `zrpc worker examples.calc:calc &`)."""

import zrpc

with zrpc.Client(timeout=5) as client:
    calc = client.proxy("calc")
    print("add(1, 2) =", calc.add(1, 2))
    futures = [calc.add.future(i, i) for i in range(100)]
    print("100 pipelined calls, sum =", sum(f.result() for f in futures))
    try:
        calc.div(1, 0)
    except zrpc.RemoteError as exc:
        print("remote error:", exc.remote_type, exc.message)
    try:
        calc.sleep.with_options(timeout=0.2)(1)
    except zrpc.Timeout:
        print("sleep(1) with a 0.2 s deadline: Timeout")
