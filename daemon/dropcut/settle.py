"""Settle: which inbox entries to ignore, and when a file is stable enough to inspect.

Everything here is pure: no I/O, no clock, no module-level mutable state.  The caller
(``watch``/``service``) feeds in what it observed (``os.stat_result`` fields, a monotonic
``now``) and keeps the returned frozen values; these functions only decide.

Time comparisons are written as ``now >= start + interval`` (never ``now - start >=
interval``) so that a caller sleeping until exactly :func:`next_check` is admitted on that
wake-up even when the float subtraction would round just below ``interval``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from fnmatch import fnmatchcase

__all__ = [
    "DEFAULT_IGNORE_DIRS",
    "DEFAULT_IGNORE_PATTERNS",
    "SIDE_FILE_PATTERNS",
    "CorruptVerdict",
    "FirstFailure",
    "Seen",
    "Verdict",
    "corrupt_verdict",
    "is_ignored",
    "is_ignored_dir",
    "is_temp_name",
    "next_check",
    "observe",
    "verdict",
]

# ---------------------------------------------------------------------------------------
# Ignore rules
# ---------------------------------------------------------------------------------------

_TEMP_AND_SYSTEM_PATTERNS: tuple[str, ...] = (
    # Hidden files: macOS AppleDouble "._x" and ".DS_Store", Syncthing ".syncthing.x.tmp",
    # rsync ".x.XXXXXX", Nextcloud ".x.~1a2b", LibreOffice ".~lock.x#", NFS ".nfsXXXX",
    # iCloud placeholders ".x.icloud", Dropbox ".dropbox" ...
    ".*",
    # Syncthing temp files on Windows ("~syncthing~x.tmp"), Office owner files ("~$x.docx").
    "~*",
    # Windows Explorer droppings.
    "Thumbs.db",
    "desktop.ini",
    # Partial downloads and sync-tool temp files.
    "*.tmp",
    "*.temp",
    "*.part",  # Firefox, Nextcloud/ownCloud, wget2
    "*.partial",  # old IE / Edge
    "*.crdownload",  # Chrome / Chromium / Edge
    "*.download",  # Safari
    "*.opdownload",  # Opera
    "*.!sync",  # Resilio / BitTorrent Sync
    "*.syncpart",
    "*.synctemp",
    "*.syncold",
    "*.swp",  # vim
    "*.ocTransferId*.part",  # ownCloud/Nextcloud WebDAV upload parts (also *.part)
)

SIDE_FILE_PATTERNS: tuple[str, ...] = (
    # Files that travel beside a photo and describe it; they are not images, and
    # quarantining them would also separate them from their photo.
    "*.xmp",  # XMP sidecars: Lightroom, Camera Raw, Bridge, darktable ("x.jpg.xmp"), digiKam
    "*.aae",  # iOS / macOS Photos edit instructions ("IMG_0001.AAE")
    "*.thm",  # camera thumbnails beside videos and raws (Canon, GoPro)
    # NTFS alternate data streams, each a file of its own once copied off Windows
    # ("photo.jpg:Zone.Identifier", also with the ":$DATA" stream type spelled out)
    "*:Zone.Identifier",
    "*:Zone.Identifier:$DATA",
    "*:SmartScreen",
    "*:com.dropbox.attrs",
    "*:encryptable",
    "*:$DATA",
    "*.pp3",  # RawTherapee processing profiles
    "*.dop",  # DxO PhotoLab
    "*.on1",  # ON1 Photo RAW
    "*.cos",  # Capture One settings
    "*.dr4",  # Canon Digital Photo Professional recipes
    "*.vrd",  # Canon recipe data
    "Picasa.ini",  # Picasa's per-folder edits
    "*.supplemental-metadata.json",  # Google Takeout ("IMG_1.jpg.supplemental-metadata.json")
    "*.*.json",  # Google Takeout, older ("IMG_1.jpg.json"): never an image anyway
)
"""Metadata side files, ignored by default (case-insensitive fnmatch on the name)."""

DEFAULT_IGNORE_PATTERNS: tuple[str, ...] = _TEMP_AND_SYSTEM_PATTERNS + SIDE_FILE_PATTERNS
"""File-name patterns (case-insensitive fnmatch on the last path component): temporary
names of sync tools and browsers, system droppings, and :data:`SIDE_FILE_PATTERNS`."""

DEFAULT_IGNORE_DIRS: tuple[str, ...] = (
    # Any hidden directory is tool state, never user content; the named ones below are
    # listed as documentation of what we know turns up (all but two start with a dot).
    ".*",
    ".dropcut-staging",  # dropcut's own staging folder
    # Synology / QNAP / generic NAS.
    "@eaDir",
    "#recycle",
    "#snapshot",
    "lost+found",
    # Sync tools.
    ".stfolder",
    ".stversions",
    ".sync",
    ".dropbox.cache",
    # macOS.
    ".Spotlight-V100",
    ".Trashes",
    ".fseventsd",
    ".TemporaryItems",
    "__MACOSX",  # expanded zip archives
    "*.download",  # Safari writes "x.jpg.download/x.jpg" while downloading
    # Windows volume roots shared over SMB.
    "$RECYCLE.BIN",
    "System Volume Information",
)
"""Directory-name patterns (case-insensitive fnmatch on every directory component)."""


def _matches_any(name: str, patterns: Sequence[str]) -> bool:
    folded = name.casefold()
    return any(fnmatchcase(folded, pattern.casefold()) for pattern in patterns)


def _components(rel_path: str) -> list[str]:
    """Components of a POSIX relative path, without empty and ``.`` components."""
    return [part for part in rel_path.split("/") if part not in ("", ".")]


def is_ignored_dir(rel_dir: str, dirs: Sequence[str]) -> bool:
    """True if any component of the directory ``rel_dir`` (relative to the inbox) matches
    one of ``dirs``.  Used to prune a directory walk.  ``""`` (the inbox itself) is never
    ignored."""
    return any(_matches_any(part, dirs) for part in _components(rel_dir))


def is_ignored(rel_path: str, patterns: Sequence[str], dirs: Sequence[str]) -> bool:
    """True if the file at ``rel_path`` (a POSIX path relative to the inbox) must be left
    alone: its name matches one of ``patterns`` or one of its directories matches one of
    ``dirs``.  Matching is case-insensitive fnmatch; ``*`` also matches newlines."""
    parts = _components(rel_path)
    if not parts:
        return False
    *directories, name = parts
    if _matches_any(name, patterns):
        return True
    return any(_matches_any(part, dirs) for part in directories)


def is_temp_name(name: str) -> bool:
    """True if a bare file name matches one of :data:`DEFAULT_IGNORE_PATTERNS` other than
    the side files, i.e. it looks like something delivered under a temporary name (to be
    renamed later) or a system dropping."""
    return _matches_any(name, _TEMP_AND_SYSTEM_PATTERNS)


# ---------------------------------------------------------------------------------------
# Stability
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Seen:
    """What we know about one inbox file between observations.

    ``observations`` counts the consecutive observations with this same
    (``size``, ``mtime_ns``); the one that started the quiet period counts as the first.
    ``first_seen`` and ``stable_since`` are on the caller's (monotonic) clock.
    """

    size: int
    mtime_ns: int
    first_seen: float
    stable_since: float
    observations: int


def observe(prev: Seen | None, *, size: int, mtime_ns: int, now: float) -> Seen:
    """Fold one observation of (size, mtime_ns) at ``now`` into what was known."""
    if prev is None:
        return Seen(size, mtime_ns, first_seen=now, stable_since=now, observations=1)
    if prev.size == size and prev.mtime_ns == mtime_ns:
        return Seen(
            size,
            mtime_ns,
            first_seen=prev.first_seen,
            stable_since=prev.stable_since,
            observations=prev.observations + 1,
        )
    return Seen(size, mtime_ns, first_seen=prev.first_seen, stable_since=now, observations=1)


class Verdict(StrEnum):
    WAIT = "wait"
    ADMIT = "admit"
    NEVER_SETTLED = "never_settled"


def verdict(seen: Seen, *, now: float, debounce: float, max_settle: float, min_observations: int) -> Verdict:
    """ADMIT once size+mtime have been quiet for ``debounce`` seconds over at least
    ``min_observations`` observations (2 when polling, 1 with native events);
    NEVER_SETTLED if that has not happened ``max_settle`` seconds after the file was first
    seen; WAIT otherwise.  ADMIT wins over NEVER_SETTLED when both hold."""
    if now >= seen.stable_since + debounce and seen.observations >= min_observations:
        return Verdict.ADMIT
    if now >= seen.first_seen + max_settle:
        return Verdict.NEVER_SETTLED
    return Verdict.WAIT


def next_check(seen: Seen, *, now: float, debounce: float) -> float:
    """When it is next worth looking at the file: the end of its quiet period, or ``now``
    if that is already past (e.g. it only lacks an observation)."""
    return max(now, seen.stable_since + debounce)


# ---------------------------------------------------------------------------------------
# Corrupt grace
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FirstFailure:
    """The file as it was when it first failed to decode."""

    size: int
    mtime_ns: int
    sha256: str
    at: float


class CorruptVerdict(StrEnum):
    RECHECK_LATER = "recheck_later"
    QUARANTINE = "quarantine"


def corrupt_verdict(
    first: FirstFailure | None,
    *,
    size: int,
    mtime_ns: int,
    sha256: str,
    now: float,
    grace: float,
) -> tuple[CorruptVerdict, FirstFailure]:
    """Decide about a stable file that failed to decode.

    Scanners and SMB clients preallocate the final size and fill the bytes in later, so
    the first failure only starts a grace period.  QUARANTINE only when the same bytes
    (size, mtime_ns and sha256 unchanged) still fail ``grace`` seconds after the first
    failure; any change restarts the grace period.  Re-check at ``first.at + grace``.
    """
    if first is None or first.size != size or first.mtime_ns != mtime_ns or first.sha256 != sha256:
        return CorruptVerdict.RECHECK_LATER, FirstFailure(size, mtime_ns, sha256, at=now)
    if now >= first.at + grace:
        return CorruptVerdict.QUARANTINE, first
    return CorruptVerdict.RECHECK_LATER, first
