"""The one place that knows where things live: folders, the database, names of outputs.

Everything here is pure: it maps a relative input path (POSIX, below the inbox) to the
names dropcut uses for it, and never touches the disk.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dropcut.settings import Settings

STAGING_DIR = ".dropcut-staging"
"""Hidden folder at the top of outbox, archive and quarantine where files are completed
before they are renamed to their final name (same file system, so the rename is atomic)."""

HELD_PREFIX = ".dropcut-held-"
"""Private name an input is renamed to, in its own folder, while dropcut checks that it is
the content whose output was written and then archives or deletes it. Never admitted,
whatever the ignore rules say."""

ERROR_SUFFIX = ".error.json"
NAME_MAX = 255


@dataclass(frozen=True)
class Layout:
    """Where every file of the daemon goes."""

    inbox: Path
    outbox: Path
    quarantine: Path
    archive: Path
    state_dir: Path

    @classmethod
    def of(cls, settings: Settings) -> Layout:
        """The layout of a configuration's folders."""
        return cls(
            inbox=settings.inbox,
            outbox=settings.outbox,
            quarantine=settings.quarantine,
            archive=settings.archive,
            state_dir=settings.state_dir,
        )

    @property
    def database(self) -> Path:
        return self.state_dir / "queue.sqlite3"

    @property
    def lock_file(self) -> Path:
        return self.state_dir / "dropcut.lock"

    @property
    def spool_dir(self) -> Path:
        """Validated copies of admitted inputs, by sha256: the bytes that get uploaded."""
        return self.state_dir / "spool"

    @property
    def cache_dir(self) -> Path:
        """Results by input sha256: the same content dropped again costs no request."""
        return self.state_dir / "results"

    def spool_file(self, sha256: str) -> Path:
        return self.spool_dir / sha256

    def proxy_file(self, sha256: str, max_side: int) -> Path:
        """The proxy of a spooled input (matte mode): derived, kept until the job ends."""
        return self.spool_dir / proxy_name(sha256, max_side)

    def staging(self, root: Path) -> Path:
        return root / STAGING_DIR

    def output_roots(self) -> tuple[Path, ...]:
        """Folders the daemon writes into (each gets a staging folder)."""
        return (self.outbox, self.archive, self.quarantine)


def proxy_name(sha256: str, max_side: int) -> str:
    """The proxy's file name in the spool, beside the input's ``<sha256>``."""
    return f"{sha256}.proxy-{max_side}"


def result_key(sha256: str, api_mode: str, proxy_max_side: int) -> str:
    """What a paid-for answer is cached under: the input's content and what was asked of
    the API about it. ``cutout``: the cut-out of the input (its sha256); ``matte``: the
    matte of its proxy, which depends on the proxy's size (``<sha256>-matte-<side>``)."""
    return sha256 if api_mode == "cutout" else f"{sha256}-matte-{proxy_max_side}"


def fit_name(base: str, suffix: str) -> str:
    """``base + suffix``, shortened so that it stays within 255 bytes of UTF-8.

    A shortened base keeps its start and gets ``~`` plus 8 hex digits of its hash, so two
    long names that share a start still get different results.
    """
    name = base + suffix
    if len(name.encode("utf-8")) <= NAME_MAX:
        return name
    tag = "~" + hashlib.sha256(base.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    budget = NAME_MAX - len((tag + suffix).encode("utf-8"))
    cut = base
    while len(cut.encode("utf-8")) > budget:
        cut = cut[:-1]
    return cut + tag + suffix


def _split(rel_path: str) -> tuple[PurePosixPath, str, str]:
    path = PurePosixPath(rel_path)
    return path.parent, path.stem, path.suffix


def output_candidates(rel_path: str, tail: str = ".png") -> Iterator[str]:
    """Output names for an input, in order of preference (the collision rule); ``tail`` is
    what follows the stem (a recipe's suffix and extension, ``.png`` by default).

    ``photos/a.jpg`` wants ``photos/a.png``. When another input of the same folder already
    owns that name (``photos/a.png`` or ``photos/A.jpeg`` came first), the next candidate
    carries the input's own extension: ``photos/a~jpg.png``, then ``photos/a~jpg~2.png``…
    Each within 255 bytes: the stem is shortened, never the tail.
    """
    parent, stem, suffix = _split(rel_path)
    yield str(parent / fit_name(stem, tail))
    ext = suffix.lstrip(".").lower() or "noext"
    yield str(parent / fit_name(f"{stem}~{ext}", tail))
    n = 2
    while True:
        yield str(parent / fit_name(f"{stem}~{ext}~{n}", tail))
        n += 1


def output_key(out_rel: str) -> str:
    """Two outputs collide when their names are equal ignoring case (SMB outboxes)."""
    return out_rel.casefold()


def error_json_rel(rel_path: str) -> str:
    """``quarantine/<rel>.error.json`` beside the quarantined input."""
    parent, name = PurePosixPath(rel_path).parent, PurePosixPath(rel_path).name
    return str(parent / fit_name(name, ERROR_SUFFIX))


def held_rel(rel_path: str, token: str) -> str:
    """The private name (:data:`HELD_PREFIX`) for ``rel_path`` while it is being disposed
    of: ``.dropcut-held-<token>-<name>`` (``<token>`` 16 hex digits), so that a held file
    found with no job holding it (its folder renamed while dropcut was down) can be given
    its name back (:func:`held_original`). A name too long for that keeps only the token."""
    path = PurePosixPath(rel_path)
    name = f"{HELD_PREFIX}{token}-{path.name}"
    if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        name = f"{HELD_PREFIX}{token}"
    return str(path.parent / name)


def held_original(held_path: str) -> str:
    """The name a held file had (see :func:`held_rel`), in its own folder; one made up
    from the token when the name did not fit."""
    path = PurePosixPath(held_path)
    rest = path.name.removeprefix(HELD_PREFIX)
    token, _, name = rest.partition("-")
    return str(path.parent / (name or f"restored-{token}"))


def numbered_candidates(rel_path: str) -> Iterator[str]:
    """Names for a move into archive or quarantine that must not overwrite: the name
    itself, then ``name~2.ext``, ``name~3.ext``…"""
    parent, stem, suffix = _split(rel_path)
    yield rel_path
    n = 2
    while True:
        yield str(parent / fit_name(f"{stem}~{n}", suffix))
        n += 1
