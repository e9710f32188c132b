"""Produce: the proxy a matte request uploads, and the output rendered from its matte.

In ``matte`` mode (the default) the upload is not the input but a proxy made here, upright,
sRGB, at most ``proxy_max_side`` px on its long side (:func:`dropcut.decode.make_proxy`);
the answer is a matte at the proxy's size, and the cut-out is rendered here at the input's
full resolution (:func:`dropcut.decode.load_full` then
:func:`dropcut.render.render_cutout`). Both are CPU work on whole images: they run in
worker processes (:func:`dropcut.worker.pool`), never on the event loop, so pacing and
the other stages go on meanwhile. In ``cutout`` mode nothing is produced here: the API's
answer is the output.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from PIL import Image

from dropcut import worker

if TYPE_CHECKING:  # (the daemon itself decodes nothing: the workers import decode and render)
    from dropcut.decode import Proxy

__all__ = ["Producer", "make_proxy_file", "render_file"]

RENDER_WORKERS = 2  # renders at once (two cores)
RENDER_NICE = 10  # renders are background work: the event loop and the proxies come first
PROXY_WORKERS = 1  # proxies have a worker of their own: the next request never waits for a render
T = TypeVar("T")


def make_proxy_file(source: Path, dest: Path, max_side: int, max_pixels: int, timeout: float) -> Proxy:
    """In a worker process: the proxy of ``source`` written to ``dest`` (atomically), or
    the one a earlier attempt wrote there. Raises :class:`dropcut.decode.DecodeError`
    when ``source`` cannot be decoded within ``max_pixels`` and ``timeout`` seconds."""
    from dropcut.decode import Proxy, make_proxy, register_openers

    try:
        register_openers()
        with Image.open(dest) as made:  # made while inspecting (renamed into place whole)
            made.load()
            return Proxy(size=made.size, format=str(made.format), bytes=dest.stat().st_size)
    except (OSError, ValueError):
        pass
    return make_proxy(source, dest, max_side=max_side, max_pixels=max_pixels, timeout=timeout)


def render_file(
    source: Path, matte: Path, dests: list[Path], recipe: str | None, strip_gps: bool, max_pixels: int
) -> float:
    """In a worker process: every output of ``recipe`` (:func:`dropcut.recipes.recipe_json`;
    None: the transparent PNG) of ``source`` (the original, as a person sees it) with the
    alpha matte ``matte`` upsampled to its full resolution, written and fsynced to
    ``dests`` (one per output, in order); returns the seconds it took. Raises
    :class:`dropcut.decode.DecodeError` or :class:`dropcut.render.MatteError`."""
    from dropcut.decode import load_full
    from dropcut.recipes import recipe_from_json
    from dropcut.render import render_outputs

    specs = recipe_from_json(recipe)
    full = load_full(source, strip_gps=strip_gps, max_pixels=max_pixels)
    outputs = list(zip(specs, dests, strict=True))
    return float(render_outputs(full.image, matte, outputs, icc_profile=full.icc_profile, exif=full.exif))


class _Pool:
    """A pool of worker processes started on first use, and started anew after a worker
    died (the OOM killer, a crash in a decoder: that call fails like any attempt)."""

    def __init__(self, workers: int, *, nice: int = 0) -> None:
        self._workers = workers
        self._nice = nice
        self._pool: ProcessPoolExecutor | None = None

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        if self._pool is None:
            self._pool = worker.pool(self._workers, nice=self._nice)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except BrokenProcessPool:
            self._pool = None
            raise

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class Producer:
    """Runs :func:`make_proxy_file` and :func:`render_file` in worker processes: proxies
    in a pool of their own, so that a request never waits behind renders."""

    def __init__(self, *, render_workers: int = RENDER_WORKERS, proxy_workers: int = PROXY_WORKERS) -> None:
        self._renders = _Pool(render_workers, nice=RENDER_NICE)
        self._proxies = _Pool(proxy_workers)

    async def proxy(
        self, source: Path, dest: Path, *, max_side: int, max_pixels: int, timeout: float
    ) -> Proxy:
        """The proxy of ``source`` at ``dest``, made in a worker process."""
        return await self._proxies.run(make_proxy_file, source, dest, max_side, max_pixels, timeout)

    async def render(
        self,
        source: Path,
        matte: Path,
        dests: list[Path],
        *,
        recipe: str | None,
        strip_gps: bool,
        max_pixels: int,
    ) -> float:
        """The outputs of ``recipe`` for ``source`` with ``matte``, rendered at ``dests``
        in a worker process."""
        return await self._renders.run(render_file, source, matte, dests, recipe, strip_gps, max_pixels)

    def close(self) -> None:
        """Stop the worker processes (a render under way is abandoned: its job goes back
        to the queue and is rendered again from the cached matte)."""
        self._renders.close()
        self._proxies.close()
