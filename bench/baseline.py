"""The seed's "throttled batch" loop (withoutBG's documentation), the baseline of ``bench.rate``.

Reimplemented faithfully with httpx's module-level ``httpx.post`` in place of
``requests.post`` (same semantics: a new connection per call, the whole answer read into
memory, 60 s timeout). Time is compressed like everything else: ``MIN_INTERVAL`` is
``period / 7`` and the 429 back-off ``min(2 ** attempt, 30)`` seconds is scaled by
``period / 60``.

The original::

    MIN_INTERVAL = 60 / 7  # ~8.6s between requests to stay under 7/min

    def remove_background(path, out_path, max_retries=5):
        for attempt in range(max_retries):
            with open(path, "rb") as f:
                r = requests.post(API, headers=HEADERS, files={"file": f}, timeout=60)
            if r.status_code == 200:
                with open(out_path, "wb") as out:
                    out.write(r.content)
                return
            if r.status_code == 429:
                wait = min(2 ** attempt, 30)  # exponential backoff, capped
                time.sleep(wait)
                continue
            r.raise_for_status()
        raise RuntimeError(f"Failed after {max_retries} retries: {path}")

    for path in inputs:
        remove_background(path, path.replace(".jpg", "-no-bg.png"))
        time.sleep(MIN_INTERVAL)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.common import API_KEY, LIMIT

REMOVE_PATH = "/v1.0/image-without-background"


@dataclass
class BaselineRun:
    started: float = 0.0  # time.time() when the loop started
    finished: float = 0.0  # ... when the last output was written
    written: int = 0
    failed: list[str] = field(default_factory=list)


def throttled_batch(api_url: str, inputs: list[Path], out_dir: Path, *, period: float) -> BaselineRun:
    api = api_url + REMOVE_PATH
    headers = {"X-API-Key": API_KEY}
    min_interval = period / LIMIT
    scale = period / 60.0
    run = BaselineRun(started=time.time())

    def remove_background(path: Path, out_path: Path, max_retries: int = 5) -> None:
        for attempt in range(max_retries):
            with open(path, "rb") as f:
                r = httpx.post(api, headers=headers, files={"file": f}, timeout=60)
            if r.status_code == 200:
                with open(out_path, "wb") as out:
                    out.write(r.content)
                run.written += 1
                run.finished = time.time()
                return
            if r.status_code == 429:
                wait = min(2**attempt, 30) * scale
                time.sleep(wait)
                continue
            r.raise_for_status()
        raise RuntimeError(f"Failed after {max_retries} retries: {path}")

    out_dir.mkdir(parents=True, exist_ok=True)
    for path in inputs:
        try:
            remove_background(path, out_dir / (path.stem + "-no-bg.png"))
        except (RuntimeError, httpx.HTTPError) as exc:  # the original would stop here
            run.failed.append(f"{path.name}: {exc}")
            break
        time.sleep(min_interval)
    return run
