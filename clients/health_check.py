"""python -m clients.health_check [ADDRESS]: a container health check.

Asks a server for its status over the standard grpc.health.v1 protocol and
exits 0 when it is SERVING, 1 otherwise (what Docker's HEALTHCHECK expects),
printing the status. grpc_health_probe does the same but is a download of its
own; this ships in the image with the code it checks.

ADDRESS defaults to HEALTH_CHECK_ADDR, else 127.0.0.1:$PORT (a service),
else 127.0.0.1:$AGENT_PORT (an agent). TLS follows the TLS_* variables, as
every client does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping


def default_address(env: Mapping[str, str]) -> str | None:
    if env.get("HEALTH_CHECK_ADDR"):
        return env["HEALTH_CHECK_ADDR"]
    for name in ("PORT", "AGENT_PORT"):
        port = env.get(name, "").strip()
        if port and port != "0":
            return f"127.0.0.1:{port}"
    return None


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(
        prog="python -m clients.health_check",
        description="Exit 0 when the server at ADDRESS reports SERVING on grpc.health.v1.",
    )
    parser.add_argument("address", nargs="?", default=None, help="host:port")
    parser.add_argument("--service", default="", help="a service name ('' is the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    args = parser.parse_args(argv)
    address = args.address or default_address(env)
    if not address:
        print("health_check: no address (give one, or set HEALTH_CHECK_ADDR, PORT or AGENT_PORT)")
        return 2
    if not 0 < args.timeout <= 600:
        print(f"health_check: --timeout {args.timeout}: expected 0 < seconds <= 600")
        return 2

    # Imported here so that a usage error costs no grpc start-up.
    from clients.health import check

    status = asyncio.run(check(address, args.service, timeout_s=args.timeout))
    print(f"{address} {args.service or '(server)'}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
