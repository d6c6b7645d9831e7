"""Which HTTP client the worker polls with: plain GETs per second against an instant remote.

Each client makes the same GETs to bench.instant_remote (its own process), at several
concurrencies, on asyncio's default loop and on uvloop. No database, no Taskman code:
only what each client costs. docs/http-client.md keeps the figures that chose aiohttp.

    python -m bench.http_clients [--requests 5000] [--concurrency 1,10,100,1000]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable

import aiohttp
import httpx

from bench.instant_remote import instant_remote

try:  # optional: only for this comparison (pip install uvloop httpx-aiohttp)
    import uvloop
except ImportError:
    uvloop = None  # type: ignore[assignment]

Get = Callable[[str], Awaitable[None]]


async def _aiohttp(base_url: str, count: int, concurrency: int) -> float:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def get(url: str) -> None:
            async with session.get(url) as response:
                await response.read()
        return await _run(get, base_url, count, concurrency)


async def _httpx(base_url: str, count: int, concurrency: int) -> float:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, trust_env=False) as client:
        async def get(url: str) -> None:
            (await client.get(url)).raise_for_status()
        return await _run(get, base_url, count, concurrency)


async def _httpx_aiohttp(base_url: str, count: int, concurrency: int) -> float:
    from httpx_aiohttp import AiohttpTransport

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency))
    async with httpx.AsyncClient(transport=AiohttpTransport(client=session),
                                 trust_env=False) as client:
        async def get(url: str) -> None:
            (await client.get(url)).raise_for_status()
        return await _run(get, base_url, count, concurrency)


async def _run(get: Get, base_url: str, count: int, concurrency: int) -> float:
    urls = iter(f"{base_url}/status/{i}" for i in range(count))

    async def fetch_all() -> None:
        for url in urls:
            await get(url)

    await asyncio.gather(*(get(f"{base_url}/warm/{i}") for i in range(min(concurrency, 100))))
    started = time.perf_counter()
    await asyncio.gather(*(fetch_all() for _ in range(concurrency)))
    return count / (time.perf_counter() - started)


CLIENTS = {"httpx": _httpx, "httpx on httpx-aiohttp": _httpx_aiohttp, "aiohttp": _aiohttp}


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--concurrency", default="1,10,100,1000")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    print(f"GETs/s, {args.requests:,} GETs each, against an instant remote")
    print(f"  {'client':<34}" + "".join(f"{c:>9}" for c in levels))
    with instant_remote() as base_url:
        loops: list[tuple[str, Callable[..., float]]] = [("asyncio", asyncio.run)]
        if uvloop is not None:
            loops.append(("uvloop", uvloop.run))
        for name, measure in CLIENTS.items():
            if name == "httpx on httpx-aiohttp" and not _installed("httpx_aiohttp"):
                continue
            for loop_name, run in loops:
                rates = [run(measure(base_url, args.requests, c)) for c in levels]
                print(f"  {name + ', ' + loop_name:<34}" + "".join(f"{r:9.0f}" for r in rates),
                      flush=True)


if __name__ == "__main__":
    main()
