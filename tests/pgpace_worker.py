"""One daemon-like process on a shared rate limit (tests/test_pgpace.py, bench/shared_rate.py).

``python -m tests.pgpace_worker MODE --conninfo … --key-id … [options]``

* ``hammer``: take slots as fast as the shared window allows until ``--until`` (each
  marked sent at once, or after ``--hold`` seconds, then released);
* ``fake``: send a JPEG to the fake API (``--url``) through the shared pacer, with
  ``--in-flight`` requests at a time, the way the dispatcher does (``mark_sent`` from the
  client's ``on_sent``), until ``--until``; ``--local``: through an in-process
  :class:`dropcut.pace.Pacer` instead (today: each daemon paces itself to the allowance);
* ``grab``: take one slot, print ``granted``, and never release it (the test kills it).

Prints one JSON line at the end (``grab``: before it waits): what it did.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from dropcut.pace import Pacer
from dropcut.pgpace import QueueUnavailable, SharedPacer


def _pacer(args: argparse.Namespace) -> SharedPacer:
    return SharedPacer(
        args.conninfo,
        key_id=args.key_id,
        limit=args.limit,
        period=args.period,
        margin=args.margin,
        lease_seconds=args.lease,
        owner=args.owner or None,
    )


async def _start_at(at: float) -> None:
    await asyncio.sleep(max(0.0, at - time.time()))


async def hammer(args: argparse.Namespace) -> dict[str, Any]:
    async with _pacer(args) as pacer:
        await pacer.heartbeat()
        await _start_at(args.start_at)
        slots = []
        while time.time() < args.until:
            async with pacer.slot() as handle:
                if args.hold:
                    await asyncio.sleep(args.hold)
                handle.mark_sent()
            slots.append(handle)
    return {"owner": pacer.owner, "slots": [[h.id, h.slot.started, h.slot.sent] for h in slots]}


async def fake(args: argparse.Namespace) -> dict[str, Any]:
    from pydantic import SecretStr

    from dropcut.client import WithoutBG
    from tests.support import image_bytes

    work = Path(tempfile.mkdtemp(prefix="pgpace-worker-"))
    source = work / "photo.jpg"
    source.write_bytes(image_bytes(seed=args.seed))
    statuses: Counter[int] = Counter()
    unavailable: list[float] = []  # when a grant found the database away
    uploads: list[float] = []  # seconds from the slot to the body sent
    pacer: Pacer | SharedPacer
    if args.local:
        pacer = Pacer(limit=args.limit, period=args.period, margin=args.margin)
    else:
        pacer = _pacer(args)
        await pacer.start()
        await pacer.heartbeat()
    client = WithoutBG(args.url, SecretStr(args.api_key), timeout=30.0, max_connections=args.in_flight)
    await _start_at(args.start_at)

    async def sender(n: int) -> None:
        while time.time() < args.until:
            try:
                handle = await pacer.acquire()
            except QueueUnavailable:  # (the database away: as the daemon, try again later)
                unavailable.append(time.time())
                await asyncio.sleep(0.5)
                continue
            with contextlib.ExitStack() as done:
                done.callback(handle.release)
                if time.time() >= args.until:
                    handle.discard()
                    return
                began = time.monotonic()

                def on_sent(_at: float, handle: Any = handle, began: float = began) -> None:
                    handle.mark_sent()
                    uploads.append(time.monotonic() - began)

                outcome = await client.remove_background(
                    source,
                    filename="photo.jpg",
                    image_format="JPEG",
                    dest=work / f"out-{n}.png",
                    on_sent=on_sent,
                )
            statuses[outcome.status or 0] += 1

    try:
        await asyncio.gather(*(sender(n) for n in range(args.in_flight)))
    finally:
        await client.aclose()
        if isinstance(pacer, SharedPacer):
            await pacer.close()
        shutil.rmtree(work, ignore_errors=True)
    owner = pacer.owner if isinstance(pacer, SharedPacer) else "local"
    return {"owner": owner, "statuses": dict(statuses), "uploads": uploads, "unavailable": unavailable}


async def grab(args: argparse.Namespace) -> dict[str, Any]:
    pacer = _pacer(args)
    handle = await pacer.acquire()
    print(json.dumps({"granted": handle.id, "owner": pacer.owner}), flush=True)
    await asyncio.Event().wait()  # killed here
    return {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.pgpace_worker")
    parser.add_argument("mode", choices=["hammer", "fake", "grab"])
    parser.add_argument("--conninfo", required=True)
    parser.add_argument("--key-id", required=True)
    parser.add_argument("--limit", type=int, default=7)
    parser.add_argument("--period", type=float, default=6.0)
    parser.add_argument("--margin", type=float, default=0.025)
    parser.add_argument("--lease", type=float, default=60.0)
    parser.add_argument("--owner", default="")
    parser.add_argument("--start-at", type=float, default=0.0)
    parser.add_argument("--until", type=float, default=0.0)
    parser.add_argument("--hold", type=float, default=0.0)
    parser.add_argument("--url", default="")
    parser.add_argument("--api-key", default="test-key")
    parser.add_argument("--in-flight", type=int, default=2)
    parser.add_argument("--local", action="store_true")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    run = {"hammer": hammer, "fake": fake, "grab": grab}[args.mode]
    result = asyncio.run(run(args))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
