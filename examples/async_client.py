"""An asyncio client: `python examples/async_client.py` (a pair and a calc worker running)."""

import asyncio

import zrpc


async def main() -> None:
    async with zrpc.AsyncClient(timeout=5) as client:
        calc = client.proxy("calc")
        print("add(2, 3) =", await calc.add(2, 3))
        squares = await asyncio.gather(*(calc.slow_square(i) for i in range(10)))
        print("squares computed concurrently:", squares)


asyncio.run(main())
