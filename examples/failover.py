"""Watch a failover by hand.

    zrpc pair &                           # note the primary's pid it prints
    zrpc worker examples.calc:calc &
    python examples/failover.py           # then, in another terminal: kill -9 <primary pid>

It calls calc.add and calc.charge without pause and prints, every second, how many calls
completed, failed, and the longest wait; kill the primary and watch it carry on.
"""

import time

import zrpc

with zrpc.Client(timeout=10) as client:
    calc = client.proxy("calc")
    done = failed = unknown = 0
    longest = 0.0
    last_print = time.monotonic()
    i = 0
    while True:
        i += 1
        t0 = time.monotonic()
        try:
            if i % 10:
                calc.add(i, i)
            else:
                calc.charge(f"acct-{i}", 1)  # not idempotent: never runs twice
            done += 1
        except zrpc.CallStateUnknown:
            unknown += 1
        except zrpc.ZrpcError as exc:
            failed += 1
            print("failed:", type(exc).__name__, exc)
        longest = max(longest, time.monotonic() - t0)
        if time.monotonic() - last_print >= 1:
            print(f"{done} calls done, {failed} failed, {unknown} state unknown, "
                  f"longest call {longest * 1000:.0f} ms")
            last_print, longest = time.monotonic(), 0.0
