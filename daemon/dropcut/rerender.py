"""Rerender: today's recipes applied again to inputs already done, from their cached mattes.

Changing a recipe costs no credit: ``dropcut rerender PATH… | --all [--since DATE]``
renders the archived (or kept) originals again with the recipe that applies to them now,
from the matte the API gave for them, and places every output as the daemon does
(atomically, under the names the queue claims for them). No request is made. An input
whose original or matte is gone, or whose original is no longer the content that was
processed, is reported with what is missing and left alone.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from dropcut.cache import ResultCache
from dropcut.paths import Layout, output_key, result_key
from dropcut.produce import render_file
from dropcut.publish import new_staging_file, place
from dropcut.queue import Job, JobQueue
from dropcut.recipes import folder_recipes, output_name_sets, recipe_for, recipe_json
from dropcut.settings import Settings

__all__ = ["Rerendered", "original_of", "rerender", "select"]


@dataclass(frozen=True)
class Rerendered:
    """What became of one input: ``outputs`` written, or ``problem`` (one line)."""

    rel_path: str
    outputs: tuple[str, ...] = ()
    problem: str | None = None


def original_of(job: Job, layout: Layout) -> Path | None:
    """Where the original of a done job is now: its archived copy (``archived_as``), or
    the inbox file it was kept as; None when neither is recorded."""
    if job.archived_as:
        return layout.archive / job.archived_as
    if job.output_rel and (layout.inbox / job.rel_path).is_file():
        return layout.inbox / job.rel_path
    return None


def select(
    jobs: Iterable[Job], wanted: set[str] | None, since: datetime | None, updated: Callable[[Job], float]
) -> list[Job]:
    """The done jobs to render again: all (``wanted`` None) or those whose inbox path or
    archived name is in ``wanted``, updated at or after ``since``."""
    out = []
    for job in jobs:
        if wanted is not None and job.rel_path not in wanted and (job.archived_as or "") not in wanted:
            continue
        if since is not None and updated(job) < since.timestamp():
            continue
        out.append(job)
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def rerender(settings: Settings, queue: JobQueue, jobs: Iterable[Job]) -> list[Rerendered]:
    """Render every job of ``jobs`` again with the recipe that applies to its path now
    (see the module docstring). Runs in this process; makes no request."""
    layout = Layout(
        settings.inbox, settings.outbox, settings.quarantine, settings.archive, settings.state_dir
    )
    cache = ResultCache(layout.cache_dir, max_bytes=settings.result_cache_bytes)
    folders = folder_recipes(settings.folders)
    results = []
    for job in jobs:
        original = original_of(job, layout)
        matte = cache.get(result_key(job.sha256, "matte", settings.proxy_max_side))
        if original is None or not original.is_file():
            results.append(
                Rerendered(job.rel_path, problem="the original is gone (not in the archive or inbox)")
            )
            continue
        if matte is None:
            results.append(
                Rerendered(
                    job.rel_path, problem="its matte is no longer cached (result_cache_bytes): drop it again"
                )
            )
            continue
        if _sha256(original) != job.sha256:
            results.append(
                Rerendered(job.rel_path, problem=f"{original} is no longer the photo that was processed")
            )
            continue
        specs = recipe_for(job.rel_path, settings.outputs, folders)
        names = queue.claim_outputs(job.rel_path, output_name_sets(job.rel_path, specs), output_key)
        staged = [new_staging_file(layout.outbox) for _ in specs]
        try:
            render_file(original, matte, staged, recipe_json(specs), settings.strip_gps, settings.max_pixels)
            for path, name in zip(staged, names, strict=True):
                place(path, layout.outbox, name)
        except Exception as exc:  # one input's failure is reported; the others go on
            results.append(Rerendered(job.rel_path, problem=f"{type(exc).__name__}: {exc}"[:300]))
            continue
        finally:
            for path in staged:
                if path.exists():
                    os.unlink(path)
        results.append(Rerendered(job.rel_path, outputs=tuple(names)))
    return results
