"""A bare grpc.aio echo server: the baseline every benchmark is a ratio to.

Unary /bench.Echo/Unary and bidi /bench.Echo/Stream return the request bytes
untouched: no protobuf, no validation, no metrics, no logging.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import grpc
import uvloop


async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def stream(requests, context):  # type: ignore[no-untyped-def]
    async for request in requests:
        yield request


async def main(ready_file: str) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.stream_stream_rpc_method_handler(stream),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    tmp = ready_file + ".tmp"
    with open(tmp, "w") as fh:
        json.dump({"port": port, "pid": os.getpid()}, fh)
    os.replace(tmp, ready_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1]))
