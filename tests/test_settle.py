"""Table-driven tests for dropcut.settle (pure decisions)."""

from __future__ import annotations

import pytest

from dropcut.settings import Settings
from dropcut.settle import (
    DEFAULT_IGNORE_DIRS,
    DEFAULT_IGNORE_PATTERNS,
    SIDE_FILE_PATTERNS,
    CorruptVerdict,
    FirstFailure,
    Seen,
    Verdict,
    corrupt_verdict,
    is_ignored,
    is_ignored_dir,
    is_temp_name,
    next_check,
    observe,
    verdict,
)

P = DEFAULT_IGNORE_PATTERNS
D = DEFAULT_IGNORE_DIRS

# ---------------------------------------------------------------------------------------
# Ignore rules
# ---------------------------------------------------------------------------------------

IGNORED_FILES = [
    # dotfiles
    ("._photo.jpg", "appledouble"),
    (".DS_Store", "ds-store"),
    (".syncthing.photo.jpg.tmp", "syncthing-tmp"),
    (".photo.jpg.Xa9fQ2", "rsync-temp"),
    (".photo.jpg.~1f2e3d", "nextcloud-temp"),
    (".~lock.sheet.ods#", "libreoffice-lock"),
    (".nfs000000000123abcd00000001", "nfs-silly-rename"),
    # tilde
    ("~syncthing~photo.jpg.tmp", "syncthing-windows-tmp"),
    ("~$report.docx", "office-owner-file"),
    ("~photo.jpg", "tilde-prefix"),
    # Windows droppings
    ("Thumbs.db", "thumbs-db"),
    ("desktop.ini", "desktop-ini"),
    # suffixes
    ("photo.jpg.tmp", "tmp"),
    ("photo.tmp", "tmp-bare"),
    ("photo.jpg.temp", "temp"),
    ("photo.jpg.part", "part"),
    ("photo.jpg.partial", "partial"),
    ("photo.jpg.crdownload", "crdownload"),
    ("photo.jpg.download", "download"),
    ("photo.jpg.opdownload", "opdownload"),
    ("photo.jpg.!sync", "resilio-sync"),
    ("photo.jpg.syncpart", "syncpart"),
    ("photo.jpg.synctemp", "synctemp"),
    ("photo.jpg.syncold", "syncold"),
    ("photo.jpg.swp", "swp"),
    ("photo.jpg.ocTransferId1234567.part", "owncloud-transfer"),
    # case-insensitivity
    ("THUMBS.DB", "thumbs-upper"),
    ("DESKTOP.INI", "desktop-upper"),
    ("photo.jpg.TMP", "tmp-upper"),
    ("photo.jpg.Part", "part-mixed"),
    ("photo.jpg.CRDOWNLOAD", "crdownload-upper"),
    # metadata side files (SIDE_FILE_PATTERNS)
    ("photo.xmp", "xmp-lightroom"),
    ("shoot/IMG_0001.CR2.xmp", "xmp-darktable-nested"),
    ("IMG_0001.XMP", "xmp-upper"),
    ("IMG_0001.AAE", "aae-ios"),
    ("IMG_E0001.aae", "aae-lower"),
    ("MVI_0001.THM", "thm-canon"),
    ("GOPR0001.thm", "thm-gopro"),
    ("photo.jpg:Zone.Identifier", "zone-identifier"),
    ("photo.jpg:Zone.Identifier:$DATA", "zone-identifier-data"),
    ("photo.jpg:SmartScreen", "smartscreen-stream"),
    ("photo.jpg:com.dropbox.attrs", "dropbox-stream"),
    ("photo.jpg:encryptable", "encryptable-stream"),
    ("photo.jpg:$DATA", "data-stream"),
    ("shoot/IMG_1.CR2.cos", "capture-one"),
    ("IMG_1.dr4", "canon-dpp-recipe"),
    ("IMG_1.VRD", "canon-recipe"),
    ("trip/Picasa.ini", "picasa-ini"),
    ("Takeout/IMG_1.jpg.supplemental-metadata.json", "takeout-supplemental"),
    ("Takeout/IMG_1.jpg.json", "takeout-json"),
    ("album/photo.jpg:zone.identifier", "zone-identifier-lower-nested"),
    ("IMG_0001.CR2.pp3", "pp3-rawtherapee"),
    ("IMG_0001.NEF.dop", "dop-dxo"),
    ("IMG_0001.on1", "on1"),
    # inside an ignored directory
    ("@eaDir/photo.jpg/SYNOPHOTO_THUMB_XL.jpg", "synology-eadir"),
    ("@EADIR/photo.jpg", "eadir-upper"),
    ("#recycle/photo.jpg", "recycle"),
    ("#snapshot/daily/photo.jpg", "snapshot"),
    (".stfolder/photo.jpg", "stfolder"),
    (".stversions/photo~20240101-101010.jpg", "stversions"),
    (".sync/photo.jpg", "resilio-dir"),
    (".dropbox.cache/2024-01-01/photo.jpg", "dropbox-cache"),
    (".Spotlight-V100/Store-V2/x.jpg", "spotlight"),
    (".Trashes/501/photo.jpg", "trashes"),
    (".fseventsd/photo.jpg", "fseventsd"),
    (".TemporaryItems/folders.501/photo.jpg", "temporary-items"),
    ("__MACOSX/album/photo.jpg", "macosx-zip"),
    ("lost+found/#1234.jpg", "lost-found"),
    (".dropcut-staging/photo.jpg", "own-staging"),
    ("album/.dropcut-staging/photo.jpg", "own-staging-nested"),
    ("photo.jpg.download/photo.jpg", "safari-bundle"),
    ("$RECYCLE.BIN/S-1-5-21/photo.jpg", "windows-recycle"),
    ("System Volume Information/photo.jpg", "windows-svi"),
    (".Trash-1000/files/photo.jpg", "freedesktop-trash"),
    ("a/b/@eaDir/c/photo.jpg", "deep-ignored-dir"),
    ("__macosx/photo.jpg", "macosx-lower"),
    # odd names
    ("photo\n.tmp", "newline-then-suffix"),
    ("фото 1.jpg.part", "cyrillic-space-part"),
]

KEPT_FILES = [
    ("photo.jpg", "plain"),
    ("photo.JPG", "upper-ext"),
    ("part.jpg", "part-stem"),
    ("my.tmp.jpg", "tmp-in-middle"),
    ("tmp/photo.jpg", "tmp-dir"),
    ("a~b.jpg", "tilde-inside"),
    ("photo.jpg~", "tilde-suffix"),
    ("photo tmp.jpg", "space-tmp"),
    ("thumbs.db.jpg", "thumbs-prefix"),
    ("partial/photo.jpg", "partial-dir"),
    ("recycle/photo.jpg", "recycle-no-hash"),
    ("eaDir/photo.jpg", "eadir-no-at"),
    ("album 2024/photo 1.jpg", "spaces"),
    ("Ünïcödé/写真.jpg", "unicode"),
    ("line\nbreak/photo\nname.jpg", "newlines"),
    ("a/b/c/d/photo.png", "deep"),
    ("photo[1].jpg", "brackets"),
    ("meeting 10:30.jpg", "colon-in-a-name-is-no-stream"),
    ("download/photo.jpg", "download-dir"),
    ("./photo.jpg", "dot-slash-prefix"),
    ("photo.xmp.jpg", "xmp-in-middle"),
    ("xmp/photo.jpg", "xmp-dir"),
    ("Zone.Identifier.jpg", "zone-identifier-stem"),
    ("photo.thm.png", "thm-in-middle"),
]


@pytest.mark.parametrize("rel_path", [r for r, _ in IGNORED_FILES], ids=[i for _, i in IGNORED_FILES])
def test_ignored(rel_path: str) -> None:
    assert is_ignored(rel_path, P, D)


@pytest.mark.parametrize("rel_path", [r for r, _ in KEPT_FILES], ids=[i for _, i in KEPT_FILES])
def test_not_ignored(rel_path: str) -> None:
    assert not is_ignored(rel_path, P, D)


def test_every_default_pattern_is_exercised() -> None:
    names = [rel.rsplit("/", 1)[-1] for rel, _ in IGNORED_FILES]
    for pattern in P:
        assert any(is_ignored(n, (pattern,), ()) for n in names), pattern


def test_side_files_are_default_ignore_patterns_users_can_replace() -> None:
    assert set(SIDE_FILE_PATTERNS) <= set(P)
    assert Settings().ignore_patterns == P
    assert not is_ignored("photo.xmp", ("*.tmp",), ())  # a list of one's own replaces them


def test_every_default_dir_is_exercised() -> None:
    dirs = [part for rel, _ in IGNORED_FILES for part in rel.split("/")[:-1]]
    for pattern in D:
        assert any(is_ignored_dir(d, (pattern,)) for d in dirs), pattern


IGNORED_DIRS = [
    ("@eaDir", True, "eadir"),
    ("@EADIR", True, "eadir-upper"),
    ("album/@eaDir", True, "nested-eadir"),
    ("@eaDir/photo.jpg", True, "below-eadir"),
    (".dropcut-staging", True, "own-staging"),
    (".git", True, "any-hidden-dir"),
    ("#Recycle", True, "recycle-mixed-case"),
    ("album", False, "plain"),
    ("album/2024", False, "nested-plain"),
    ("", False, "inbox-itself"),
    (".", False, "dot"),
    ("tmp", False, "tmp"),
    ("eaDir", False, "eadir-no-at"),
]


@pytest.mark.parametrize(
    ("rel_dir", "expected"),
    [(d, e) for d, e, _ in IGNORED_DIRS],
    ids=[i for _, _, i in IGNORED_DIRS],
)
def test_is_ignored_dir(rel_dir: str, expected: bool) -> None:
    assert is_ignored_dir(rel_dir, D) is expected


def test_patterns_are_not_applied_to_dirs_nor_dirs_to_names() -> None:
    # A directory named like a temp file is not pruned by the file patterns ...
    assert not is_ignored("photo.tmp.d/photo.jpg", ("*.tmp",), ())
    assert not is_ignored("x.tmp/photo.jpg", ("*.tmp",), ())
    # ... and a file named like an ignored directory is not ignored by the dir rules.
    assert not is_ignored("album/@eaDir", (), ("@eaDir",))
    assert is_ignored("album/@eaDir/x.jpg", (), ("@eaDir",))


def test_custom_rules_and_empty_rules() -> None:
    assert is_ignored("raw/IMG_1.CR2", ("*.cr2",), ())
    assert is_ignored("Private/a.jpg", (), ("private",))
    assert not is_ignored(".DS_Store", (), ())
    assert not is_ignored("", P, D)


TEMP_NAMES = [
    ("photo.jpg.part", True, "part"),
    (".syncthing.photo.jpg.tmp", True, "syncthing"),
    ("~syncthing~photo.jpg.tmp", True, "syncthing-windows"),
    ("photo.jpg.CRDOWNLOAD", True, "crdownload-upper"),
    ("photo.jpg", False, "final-name"),
    ("my.tmp.jpg", False, "tmp-in-middle"),
    ("photo.xmp", False, "side-file-is-no-temp-name"),
    ("photo.jpg:Zone.Identifier", False, "zone-identifier-is-no-temp-name"),
]


@pytest.mark.parametrize(
    ("name", "expected"), [(n, e) for n, e, _ in TEMP_NAMES], ids=[i for _, _, i in TEMP_NAMES]
)
def test_is_temp_name(name: str, expected: bool) -> None:
    assert is_temp_name(name) is expected


# ---------------------------------------------------------------------------------------
# Stability
# ---------------------------------------------------------------------------------------


def test_observe_first_sighting() -> None:
    assert observe(None, size=10, mtime_ns=5, now=100.0) == Seen(10, 5, 100.0, 100.0, 1)


def test_observe_same_counts_up_and_keeps_stable_since() -> None:
    seen = observe(observe(None, size=10, mtime_ns=5, now=100.0), size=10, mtime_ns=5, now=101.0)
    assert seen == Seen(10, 5, first_seen=100.0, stable_since=100.0, observations=2)


@pytest.mark.parametrize(("size", "mtime_ns"), [(11, 5), (10, 6), (0, 0)], ids=["size", "mtime", "both"])
def test_observe_change_restarts_quiet_period(size: int, mtime_ns: int) -> None:
    prev = Seen(10, 5, first_seen=100.0, stable_since=100.0, observations=7)
    assert observe(prev, size=size, mtime_ns=mtime_ns, now=105.0) == Seen(
        size, mtime_ns, first_seen=100.0, stable_since=105.0, observations=1
    )


Step = tuple[float, int, int]  # (now, size, mtime_ns) observed


def run(steps: list[Step], *, at: float, debounce: float, max_settle: float, min_obs: int) -> Verdict:
    seen: Seen | None = None
    for now, size, mtime_ns in steps:
        seen = observe(seen, size=size, mtime_ns=mtime_ns, now=now)
    assert seen is not None
    return verdict(seen, now=at, debounce=debounce, max_settle=max_settle, min_observations=min_obs)


SEQUENCES: list[tuple[str, list[Step], float, int, Verdict]] = [
    # native events: one observation starts the quiet period and is enough
    ("native-too-early", [(0.0, 10, 1)], 1.9, 1, Verdict.WAIT),
    ("native-at-debounce", [(0.0, 10, 1)], 2.0, 1, Verdict.ADMIT),
    ("native-after-debounce", [(0.0, 10, 1)], 5.0, 1, Verdict.ADMIT),
    # polling: the quiet period must be confirmed by a second observation
    ("poll-one-observation", [(0.0, 10, 1)], 5.0, 2, Verdict.WAIT),
    ("poll-two-observations", [(0.0, 10, 1), (2.0, 10, 1)], 2.0, 2, Verdict.ADMIT),
    ("poll-two-obs-too-early", [(0.0, 10, 1), (1.0, 10, 1)], 1.5, 2, Verdict.WAIT),
    # growing file: the quiet period restarts at the last change
    ("grew-then-quiet", [(0.0, 10, 1), (1.0, 20, 2), (2.5, 20, 2)], 2.9, 2, Verdict.WAIT),
    ("grew-then-quiet-long", [(0.0, 10, 1), (1.0, 20, 2), (3.0, 20, 2)], 4.0, 2, Verdict.ADMIT),
    ("mtime-only-change", [(0.0, 10, 1), (1.5, 10, 2)], 2.5, 1, Verdict.WAIT),
    # a file that keeps changing never settles
    (
        "keeps-changing",
        [(float(t), 10 * t, t) for t in range(0, 31)],
        30.5,
        2,
        Verdict.NEVER_SETTLED,
    ),
    ("keeps-changing-before-max", [(0.0, 1, 1), (10.0, 2, 2)], 11.0, 1, Verdict.WAIT),
    # admission wins when both hold at once
    ("admit-beats-max-settle", [(0.0, 1, 1), (28.0, 2, 2), (30.0, 2, 2)], 30.0, 2, Verdict.ADMIT),
    ("exactly-at-max-settle", [(0.0, 1, 1), (29.0, 2, 2)], 30.0, 1, Verdict.NEVER_SETTLED),
]


@pytest.mark.parametrize(
    ("steps", "at", "min_obs", "expected"),
    [(s, a, m, e) for _, s, a, m, e in SEQUENCES],
    ids=[i for i, *_ in SEQUENCES],
)
def test_verdict_sequences(steps: list[Step], at: float, min_obs: int, expected: Verdict) -> None:
    assert run(steps, at=at, debounce=2.0, max_settle=30.0, min_obs=min_obs) is expected


def test_float_boundary_admits_at_next_check() -> None:
    # 0.3 - 0.1 < 0.2 in floating point; waking at next_check must still admit.
    seen = observe(None, size=1, mtime_ns=1, now=0.1)
    wake = next_check(seen, now=0.1, debounce=0.2)
    assert wake == 0.1 + 0.2
    assert verdict(seen, now=wake, debounce=0.2, max_settle=60.0, min_observations=1) is Verdict.ADMIT
    assert verdict(seen, now=0.3, debounce=0.2, max_settle=60.0, min_observations=1) is Verdict.WAIT


NEXT_CHECKS = [
    ("quiet-period-pending", Seen(1, 1, 0.0, 10.0, 1), 11.0, 12.0),
    ("already-past", Seen(1, 1, 0.0, 10.0, 1), 15.0, 15.0),
    ("just-started", Seen(1, 1, 10.0, 10.0, 1), 10.0, 12.0),
]


@pytest.mark.parametrize(
    ("seen", "now", "expected"),
    [(s, n, e) for _, s, n, e in NEXT_CHECKS],
    ids=[i for i, *_ in NEXT_CHECKS],
)
def test_next_check(seen: Seen, now: float, expected: float) -> None:
    assert next_check(seen, now=now, debounce=2.0) == expected


def test_poll_loop_driven_by_next_check() -> None:
    """Simulate a poller: stat at each next_check until a verdict other than WAIT."""
    seen = observe(None, size=5, mtime_ns=5, now=0.0)
    now = 0.0
    for _ in range(10):
        v = verdict(seen, now=now, debounce=2.0, max_settle=30.0, min_observations=2)
        if v is not Verdict.WAIT:
            break
        now = max(next_check(seen, now=now, debounce=2.0), now + 0.5)
        seen = observe(seen, size=5, mtime_ns=5, now=now)
    assert v is Verdict.ADMIT
    assert now == 2.0
    assert seen.observations == 2


# ---------------------------------------------------------------------------------------
# Corrupt grace
# ---------------------------------------------------------------------------------------

FIRST = FirstFailure(size=100, mtime_ns=7, sha256="aa", at=50.0)

CORRUPT_ROWS: list[tuple[str, FirstFailure | None, int, int, str, float, CorruptVerdict, float]] = [
    # id, first, size, mtime_ns, sha256, now, expected verdict, expected .at
    ("first-failure", None, 100, 7, "aa", 50.0, CorruptVerdict.RECHECK_LATER, 50.0),
    ("unchanged-too-early", FIRST, 100, 7, "aa", 59.9, CorruptVerdict.RECHECK_LATER, 50.0),
    ("unchanged-at-grace", FIRST, 100, 7, "aa", 60.0, CorruptVerdict.QUARANTINE, 50.0),
    ("unchanged-after-grace", FIRST, 100, 7, "aa", 500.0, CorruptVerdict.QUARANTINE, 50.0),
    ("size-changed", FIRST, 101, 7, "aa", 500.0, CorruptVerdict.RECHECK_LATER, 500.0),
    ("mtime-changed", FIRST, 100, 8, "aa", 500.0, CorruptVerdict.RECHECK_LATER, 500.0),
    ("content-changed", FIRST, 100, 7, "bb", 500.0, CorruptVerdict.RECHECK_LATER, 500.0),
]


@pytest.mark.parametrize(
    ("first", "size", "mtime_ns", "sha256", "now", "expected", "at"),
    [row[1:] for row in CORRUPT_ROWS],
    ids=[row[0] for row in CORRUPT_ROWS],
)
def test_corrupt_verdict(
    first: FirstFailure | None,
    size: int,
    mtime_ns: int,
    sha256: str,
    now: float,
    expected: CorruptVerdict,
    at: float,
) -> None:
    got, record = corrupt_verdict(first, size=size, mtime_ns=mtime_ns, sha256=sha256, now=now, grace=10.0)
    assert got is expected
    assert record == FirstFailure(size, mtime_ns, sha256, at)


def test_corrupt_preallocated_then_filled() -> None:
    """A scanner preallocates: first check fails, the bytes change, then decode works —
    the caller never gets QUARANTINE for the early zeros."""
    v1, first = corrupt_verdict(None, size=100, mtime_ns=1, sha256="zeros", now=0.0, grace=10.0)
    v2, second = corrupt_verdict(first, size=100, mtime_ns=1, sha256="filled", now=12.0, grace=10.0)
    assert (v1, v2) == (CorruptVerdict.RECHECK_LATER, CorruptVerdict.RECHECK_LATER)
    assert second.at == 12.0
