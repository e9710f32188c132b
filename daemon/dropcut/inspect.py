"""Inspect: open an inbox file safely, copy it to the spool while hashing, validate it.

This is the only module that opens files in the inbox.  Security model: anyone who can
write to the inbox must not be able to make dropcut read anything outside it.

* Every path is walked component by component from a directory fd of the inbox, each
  directory opened with ``O_NOFOLLOW | O_DIRECTORY`` relative to its parent, the file with
  ``O_NOFOLLOW``; a symbolic link at any depth is rejected and its target never opened.
  (The inbox directory itself is configured by the administrator and may be a link.)
* The entry is ``lstat``-ed before it is opened so FIFOs, sockets and devices are not even
  opened; the file is opened with ``O_NONBLOCK | O_NOCTTY`` anyway (a FIFO swapped in
  between cannot block us, a tty cannot become our terminal) and the ``fstat`` of what was
  actually opened is authoritative: only ``S_ISREG`` with ``st_nlink == 1`` is read
  (a hard link could point outside the inbox).
* The bytes that will be uploaded are the bytes that were validated and hashed: one read
  pass copies the file into ``spool_dir`` while computing its sha256; the caller uploads
  ``spool_dir/<sha256>``, never the inbox file.  If the source's size or mtime changed
  during the read the result is :class:`Changed`.

Results are returned, not raised.  Only programming errors (a malformed ``rel_path``) and
failures on the daemon's own spool disk (``ENOSPC``, a missing ``spool_dir``...) raise.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import errno
import hashlib
import os
import stat
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from dropcut.capture import Capture, Note
from dropcut.decode import (
    API_FORMATS,
    DEFAULT_DECODE_TIMEOUT_SECONDS,
    DEFAULT_MAX_DECODE_BYTES,
    SUPPORTED_FORMATS,
    Budget,
    DecodeError,
    DecodeFailure,
    MultiFrame,
    RefusalCode,
    camera_raw_kind,
    check_image,
    make_proxy,
)
from dropcut.paths import proxy_name

__all__ = [
    "API_FORMATS",
    "SUPPORTED_FORMATS",
    "Changed",
    "Inspected",
    "Inspection",
    "RefusalCode",
    "Refused",
    "RejectReason",
    "Rejected",
    "Unreadable",
    "Vanished",
    "describe_content",
    "inspect_file",
    "inspect_some",
    "open_dir_nofollow",
    "sniff_format",
    "stat_entry",
    "sync_spool",
]

_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

_CHUNK = 1 << 20
_HEAD = 64
_VANISHED_ERRNOS = (errno.ENOENT, errno.ESTALE)

# ---------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------


class RejectReason(StrEnum):
    SYMBOLIC_LINK = "symbolic_link"
    HARD_LINK = "hard_link"
    NOT_REGULAR_FILE = "not_regular_file"


@dataclass(frozen=True, slots=True)
class Inspected:
    """A valid image; its exact bytes (sha256) are in ``spool_path`` ready to upload.
    ``width``/``height`` are the stored pixel dimensions (EXIF orientation not applied).
    ``frames``: how many frames or pages the file has (multi-page TIFF, animated GIF,
    WebP, PNG or AVIF); only the first is used, so more than 1 is worth a log line
    (``frames_skipped``).  MPO and HEIF count 1: their primary image is the picture."""

    rel_path: str
    sha256: str
    size: int
    mtime_ns: int
    inode: int
    device: int
    format: str
    width: int
    height: int
    spool_path: Path
    ctime_ns: int = 0  # with size, mtime and inode: the signature a rescan recognises
    frames: int = 1


@dataclass(frozen=True, slots=True)
class Refused:
    """The file was read but the API would refuse it (``status`` is the HTTP status the
    API answers with); it belongs in quarantine.  No spool file is left behind."""

    rel_path: str
    status: int
    code: str
    detail: str
    sha256: str | None
    size: int | None
    mtime_ns: int | None
    inode: int | None
    device: int | None
    ctime_ns: int | None = None


@dataclass(frozen=True, slots=True)
class Rejected:
    """Not something dropcut reads (a :class:`RejectReason`); left where it is."""

    rel_path: str
    reason: str


@dataclass(frozen=True, slots=True)
class Unreadable:
    """An error that may go away (EACCES, EPERM, EBUSY, EIO, EAGAIN from a lease...)."""

    rel_path: str
    errno_name: str
    detail: str


@dataclass(frozen=True, slots=True)
class Vanished:
    rel_path: str


@dataclass(frozen=True, slots=True)
class Changed:
    """Size or mtime changed while the file was read: let it settle again."""

    rel_path: str


Inspection = Inspected | Refused | Rejected | Unreadable | Vanished | Changed


# ---------------------------------------------------------------------------------------
# Content sniffing (pure)
# ---------------------------------------------------------------------------------------


def sniff_format(head: bytes) -> str | None:
    """The supported image format (one of :data:`SUPPORTED_FORMATS`) the leading bytes
    announce, or None.

    The API's rules: JPEG ``FF D8 FF``; PNG signature; ``RIFF....WEBP``; TIFF
    ``II*\\0``/``MM\\0*``; BMP ``BM``; GIF ``GIF87a``/``GIF89a``.  And ISO base media
    (ISO/IEC 14496-12) ``ftyp`` boxes: "AVIF" if the major or a compatible brand is
    ``avif``/``avis`` (AV1 Image File Format), else "HEIF" if one is a HEIF brand
    (ISO/IEC 23008-12: ``heic``, ``heix``, ``mif1``...).  Camera raw files that look like
    a TIFF (CR2, DNG...) are sniffed as TIFF: :func:`dropcut.decode.camera_raw_kind` tells
    them apart.
    """
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head.startswith(b"BM"):
        return "BMP"
    return _sniff_ftyp(head)


def _ftyp_brands(head: bytes) -> list[bytes]:
    """The major and compatible brands of a leading ``ftyp`` box (as far as ``head``
    holds it), or [] if ``head`` does not start with one."""
    if len(head) < 12 or head[4:8] != b"ftyp":
        return []
    size = int.from_bytes(head[:4], "big")
    end = min(len(head), size) if size >= 16 else 12
    brands = [head[8:12]]  # the major brand; then minor version (4 bytes), compatible ones
    brands += [head[i : i + 4] for i in range(16, end - 3, 4)]
    return brands


def _sniff_ftyp(head: bytes) -> str | None:
    brands = _ftyp_brands(head)
    if not brands or brands[0].startswith(b"crx"):
        return None  # not ISO media, or a Canon CR3 raw file
    if any(brand in _AVIF_BRANDS for brand in brands):
        return "AVIF"
    if any(brand in _HEIF_BRANDS for brand in brands):
        return "HEIF"
    return None


_HEIF_BRANDS = frozenset(
    {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"}
)
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_MP4_BRANDS = frozenset(
    {b"isom", b"iso2", b"iso4", b"iso5", b"iso6", b"mp41", b"mp42", b"M4V ", b"dash", b"avc1"}
)
_PREFIXES: tuple[tuple[bytes, str], ...] = (
    (b"%PDF-", "PDF document"),
    (b"PK\x03\x04", "ZIP archive"),
    (b"PK\x05\x06", "ZIP archive"),
    (b"PK\x07\x08", "ZIP archive"),
    (b"\x1f\x8b", "gzip archive"),
    (b"Rar!\x1a\x07", "RAR archive"),
    (b"7z\xbc\xaf\x27\x1c", "7z archive"),
    (b"8BPS", "Photoshop document"),
    (b"II+\x00", "BigTIFF"),
    (b"MM\x00+", "BigTIFF"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\x00\x00\x01\x00", "ICO icon"),
    (b"{\\rtf", "RTF document"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "MS Office document"),
)


def describe_content(head: bytes) -> str:
    """A human name for what the leading bytes look like, for refusal details:
    a supported format's name, e.g. "PDF document", "HEIC", "ZIP archive", "text",
    or "unknown"."""
    sniffed = sniff_format(head)
    if sniffed is not None and sniffed not in ("HEIF", "AVIF"):
        return sniffed
    if not head:
        return "empty"
    if head[4:8] == b"ftyp":
        if sniffed == "AVIF":
            return "AVIF"
        brand = head[8:12]
        if brand in _HEIF_BRANDS:
            return "HEIC"
        if brand in _AVIF_BRANDS:
            return "AVIF"
        if brand == b"qt  ":
            return "QuickTime video"
        if brand.startswith(b"crx"):
            return "Canon CR3 raw"
        if brand in _MP4_BRANDS or brand.startswith(b"3gp"):
            return "MP4 video"
        return "ISO media (ftyp " + brand.decode("ascii", "replace").strip() + ")"
    for prefix, name in _PREFIXES:
        if head.startswith(prefix):
            return name
    if head[:4] == b"RIFF":
        return "RIFF container (" + head[8:12].decode("ascii", "replace").strip() + ")"
    if b"\x00" not in head:
        try:
            text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        except UnicodeDecodeError:
            return "unknown"
        stripped = text.lstrip("\ufeff \t\r\n").lower()
        if stripped.startswith("<svg") or (stripped.startswith("<?xml") and "<svg" in stripped):
            return "SVG image"
        if stripped.startswith(("<!doctype html", "<html")):
            return "HTML document"
        if stripped.startswith("<?xml"):
            return "XML document"
        return "text"
    return "unknown"


# ---------------------------------------------------------------------------------------
# Walking without following links
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _WalkFailure:
    """Opening the inbox or one directory component failed: the error, and that
    component's own lstat taken right after (None for the inbox itself or if gone)."""

    error: OSError
    lstat: os.stat_result | None


def _split(rel_path: str) -> list[str]:
    """The components of ``rel_path``; a caller bug (ValueError) if it could escape the
    inbox or is not a plain relative path."""
    parts = rel_path.split("/")
    if "\x00" in rel_path or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"not a plain relative path below the inbox: {rel_path!r}")
    return parts


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None


def _walk(root: Path, parts: Sequence[str]) -> int | _WalkFailure:
    """An fd of ``root/parts...``, every component opened with O_NOFOLLOW relative to its
    parent (``root`` itself is opened normally), or what stopped the walk."""
    try:
        fd = os.open(root, _ROOT_FLAGS)
    except OSError as err:
        return _WalkFailure(err, None)
    try:
        for name in parts:
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as err:
                return _WalkFailure(err, _lstat_at(fd, name))
            parent, fd = fd, child
            os.close(parent)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_dir_nofollow(root: Path, rel_dir: str) -> int:
    """An ``O_RDONLY | O_DIRECTORY`` fd of ``root/rel_dir`` (``""`` or ``"."`` is ``root``
    itself), walking component by component with ``O_NOFOLLOW``.  Raises OSError: a
    symbolic link gives ELOOP or ENOTDIR, a missing component ENOENT.  The caller closes
    the fd."""
    parts = [] if rel_dir in ("", ".") else _split(rel_dir.rstrip("/"))
    walked = _walk(root, parts)
    if isinstance(walked, _WalkFailure):
        raise walked.error
    return walked


def _is_link(st: os.stat_result | None) -> bool:
    return st is not None and stat.S_ISLNK(st.st_mode)


def stat_entry(inbox: Path, rel_path: str) -> os.stat_result | None:
    """lstat of ``inbox/rel_path`` without following any link (for settle observations).

    None if it does not exist (or a directory component is now a file).  A symbolic link
    is not an error: if the entry, or one of its directory components, is a link, that
    link's own lstat is returned (stable; :func:`inspect_file` will then reject it).
    Other errors (EACCES, EIO...) raise OSError.
    """
    parts = _split(rel_path)
    dir_fd = _walk(inbox, parts[:-1])
    if isinstance(dir_fd, _WalkFailure):
        if _is_link(dir_fd.lstat):
            return dir_fd.lstat
        if dir_fd.error.errno in (*_VANISHED_ERRNOS, errno.ENOTDIR):
            return None
        raise dir_fd.error
    try:
        return os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
    except OSError as err:
        if err.errno in (*_VANISHED_ERRNOS, errno.ENOTDIR):
            return None
        raise
    finally:
        os.close(dir_fd)


def _errno_name(err: OSError) -> str:
    if err.errno is None:
        return "UNKNOWN"
    return errno.errorcode.get(err.errno, f"E{err.errno}")


def _unreadable(rel_path: str, err: OSError) -> Unreadable:
    return Unreadable(rel_path, _errno_name(err), err.strerror or str(err))


def _classify_open_error(rel_path: str, err: OSError, lst: os.stat_result | None) -> Inspection:
    """Map a failure to open a component (directory or the file) to a result; ``lst`` is
    that component's own lstat taken just after the failure."""
    if _is_link(lst):
        return Rejected(rel_path, RejectReason.SYMBOLIC_LINK)
    if err.errno in _VANISHED_ERRNOS:
        return Vanished(rel_path)
    if lst is None and err.errno in (errno.ENOTDIR, errno.ELOOP):
        return Vanished(rel_path)
    if err.errno == errno.ENOTDIR and lst is not None and not stat.S_ISDIR(lst.st_mode):
        return Vanished(rel_path)  # a directory component is now a file: no such path
    if lst is not None and not stat.S_ISREG(lst.st_mode) and not stat.S_ISDIR(lst.st_mode):
        return Rejected(rel_path, RejectReason.NOT_REGULAR_FILE)  # e.g. ENXIO for a socket
    return _unreadable(rel_path, err)


def _reject_kind(st: os.stat_result) -> RejectReason | None:
    if stat.S_ISLNK(st.st_mode):
        return RejectReason.SYMBOLIC_LINK
    if not stat.S_ISREG(st.st_mode):
        return RejectReason.NOT_REGULAR_FILE
    if st.st_nlink > 1:
        return RejectReason.HARD_LINK
    return None


def inspect_file(
    inbox: Path,
    rel_path: str,
    *,
    spool_dir: Path,
    max_bytes: int,
    max_pixels: int | None = None,
    sync: bool = True,
    decode_timeout: float = DEFAULT_DECODE_TIMEOUT_SECONDS,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    max_upload_bytes: int | None = None,
    multi_frame: MultiFrame = "first",
    api_formats_only: bool = False,
) -> Inspection:
    """Open ``inbox/rel_path`` without following links, copy it to ``spool_dir`` while
    hashing, and validate it, in this order: empty (422 ``empty``); over ``max_bytes``,
    the largest file dropcut reads (413 ``too_large``); camera raw by signature or TIFF
    tags (415 ``camera_raw``, see :func:`dropcut.decode.camera_raw_kind`: no request is
    ever made for one); format by content (415 ``unsupported_format``; with
    ``api_formats_only``, i.e. ``api_mode = "cutout"`` where the file itself is uploaded,
    HEIF and AVIF too, as the API does not take them); over ``max_upload_bytes`` if given
    (413 ``too_large``: the file itself is uploaded and the API refuses files over
    10 MB; None in matte mode, where a proxy is uploaded); over ``max_pixels`` by its
    header, full decode (422); more than one frame with ``multi_frame="quarantine"``
    (422 ``multi_frame``; with "first" the count is in ``Inspected.frames``).

    The decode check takes at most ``decode_timeout`` seconds (else 422
    ``decode_too_slow``) and holds at most about ``max_decode_bytes`` bytes of decoded
    data: bigger images get a complete-stream check instead (see :func:`_decode`).

    ``sync=False`` leaves the spool file and folder unsynced: the caller batching many
    files calls :func:`sync_spool` once before it records them.

    On :class:`Inspected` the file's bytes are in ``spool_dir/<sha256>``; in every other
    case no spool file is left behind.  Raises ValueError for a ``rel_path`` that is not
    a plain relative path, and OSError for failures on the spool side only.
    """
    parts = _split(rel_path)
    dir_fd = _walk(inbox, parts[:-1])
    if isinstance(dir_fd, _WalkFailure):
        return _classify_open_error(rel_path, dir_fd.error, dir_fd.lstat)
    try:
        budget = Budget(decode_timeout, max_decode_bytes)
        policy = _Policy(max_upload_bytes, multi_frame, api_formats_only)
        return _inspect_in(
            dir_fd, parts[-1], rel_path, spool_dir, max_bytes, max_pixels, sync, budget, policy
        )
    finally:
        os.close(dir_fd)


@dataclass(frozen=True, slots=True)
class _Policy:
    """What the API mode asks of an admitted file (see :func:`inspect_file`)."""

    max_upload_bytes: int | None = None
    multi_frame: MultiFrame = "first"
    api_formats_only: bool = False


def sync_spool(spool_dir: Path) -> None:
    """Make every spool file written with ``sync=False`` durable: one ``syncfs`` of the
    spool's file system instead of two fsyncs per file."""
    fd = os.open(spool_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs failed", str(spool_dir))
    except AttributeError:  # no syncfs in this libc
        os.sync()
    finally:
        os.close(fd)


def _inspect_in(
    dir_fd: int,
    name: str,
    rel_path: str,
    spool_dir: Path,
    max_bytes: int,
    max_pixels: int | None = None,
    sync: bool = True,
    budget: Budget | None = None,
    policy: _Policy | None = None,
) -> Inspection:
    # Look before opening, so FIFOs, sockets, devices and links are never opened at all.
    try:
        before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as err:
        return _classify_open_error(rel_path, err, None)
    kind = _reject_kind(before)
    if kind is not None:
        return Rejected(rel_path, kind)

    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as err:
        return _classify_open_error(rel_path, err, _lstat_at(dir_fd, name))
    try:
        st = os.fstat(fd)  # what was really opened is what counts
        kind = _reject_kind(st)
        if kind is not None:
            return Rejected(rel_path, kind)
        return _read_and_validate(fd, st, rel_path, spool_dir, max_bytes, max_pixels, sync, budget, policy)
    finally:
        os.close(fd)


def _read_and_validate(
    fd: int,
    st: os.stat_result,
    rel_path: str,
    spool_dir: Path,
    max_bytes: int,
    max_pixels: int | None = None,
    sync: bool = True,
    budget: Budget | None = None,
    policy: _Policy | None = None,
) -> Inspection:
    budget = budget or Budget()
    policy = policy or _Policy()
    digest = hashlib.sha256()
    head = b""
    total = 0
    tmp_path: Path | None = None
    out_fd = -1
    if 0 < st.st_size <= max_bytes:  # nothing to spool for an empty or too large file
        out_fd, tmp_name = tempfile.mkstemp(dir=spool_dir, prefix=".spool-", suffix=".tmp")
        tmp_path = Path(tmp_name)
    try:
        # One pass: hash everything, copy to the spool only while within max_bytes.
        while True:
            try:
                chunk = os.read(fd, _CHUNK)
            except OSError as err:
                if err.errno in _VANISHED_ERRNOS:
                    return Vanished(rel_path)
                return _unreadable(rel_path, err)
            if not chunk:
                break
            total += len(chunk)
            if total > st.st_size:
                return Changed(rel_path)  # growing while we read: don't chase it
            digest.update(chunk)
            if len(head) < _HEAD:
                head += chunk[: _HEAD - len(head)]
            if out_fd >= 0:
                _write_all(out_fd, chunk)
        try:
            after = os.fstat(fd)
        except OSError as err:
            return _unreadable(rel_path, err)
        if (
            total != st.st_size
            or after.st_size != st.st_size
            or after.st_mtime_ns != st.st_mtime_ns
            or after.st_ctime_ns != st.st_ctime_ns  # written in place with the mtime put back
        ):
            return Changed(rel_path)

        sha256 = digest.hexdigest()

        def refuse(status: int, code: RefusalCode, detail: str) -> Refused:
            return Refused(
                rel_path,
                status,
                code,
                detail,
                sha256,
                total,
                st.st_mtime_ns,
                st.st_ino,
                st.st_dev,
                st.st_ctime_ns,
            )

        if total == 0:
            return refuse(422, RefusalCode.EMPTY, "the file is empty (0 bytes)")
        if total > max_bytes or tmp_path is None:
            return refuse(
                413,
                RefusalCode.TOO_LARGE,
                f"the file is {total} bytes, over the limit of {max_bytes} bytes",
            )
        if sync:
            os.fsync(out_fd)
        os.close(out_fd)
        out_fd = -1
        raw_kind = camera_raw_kind(tmp_path, head)
        if raw_kind is not None:
            return refuse(
                415,
                RefusalCode.CAMERA_RAW,
                f"a camera raw file ({raw_kind}): dropcut does not develop raw files; "
                "export it as a JPEG or TIFF from your raw converter and drop that instead",
            )
        fmt = sniff_format(head)
        if fmt is None:
            return refuse(
                415,
                RefusalCode.UNSUPPORTED_FORMAT,
                f"not a JPEG, PNG, WebP, TIFF, BMP, GIF, HEIC or AVIF image "
                f"(content looks like: {describe_content(head)})",
            )
        if policy.api_formats_only and fmt not in API_FORMATS:
            return refuse(
                415,
                RefusalCode.UNSUPPORTED_FORMAT,
                f"a {describe_content(head)} image: the API takes only JPEG, PNG, WebP, TIFF, BMP "
                'and GIF, and api_mode = "cutout" uploads the file as it is '
                '(api_mode = "matte" sends a JPEG proxy of it)',
            )
        if policy.max_upload_bytes is not None and total > policy.max_upload_bytes:
            return refuse(
                413,
                RefusalCode.TOO_LARGE,
                f"the file is {total} bytes, over the upload limit of {policy.max_upload_bytes} bytes "
                '(api_max_upload_bytes: the API refuses files over 10 MB; api_mode = "matte" '
                "uploads a small proxy instead)",
            )

        checked = check_image(
            tmp_path, fmt, max_pixels, timeout=budget.timeout, max_decode_bytes=budget.max_decode_bytes
        )
        if isinstance(checked, DecodeFailure):
            return refuse(checked.status, checked.code, checked.detail)
        width, height = checked.width, checked.height
        if checked.frames > 1 and policy.multi_frame == "quarantine":
            return refuse(
                422,
                RefusalCode.MULTI_FRAME,
                f'the {fmt} has {checked.frames} frames or pages and multi_frame = "quarantine": '
                'save the one you want as a file of its own, or set multi_frame = "first"',
            )

        spool_path = spool_dir / sha256
        _finalize_spool(tmp_path, spool_path, sha256, total, sync=sync)
        tmp_path = None
        return Inspected(
            rel_path=rel_path,
            sha256=sha256,
            size=total,
            mtime_ns=st.st_mtime_ns,
            inode=st.st_ino,
            device=st.st_dev,
            format=fmt,
            width=width,
            height=height,
            spool_path=spool_path,
            ctime_ns=st.st_ctime_ns,
            frames=checked.frames,
        )
    finally:
        if out_fd >= 0:
            os.close(out_fd)
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fp:
        while chunk := fp.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _finalize_spool(tmp_path: Path, spool_path: Path, sha256: str, size: int, *, sync: bool = True) -> None:
    """Move the fsync'ed temp file to ``spool_dir/<sha256>``; if that already holds the
    same bytes, keep it (someone may be uploading it) and drop the temp file."""
    try:
        existing = os.stat(spool_path, follow_symlinks=False)
    except FileNotFoundError:
        existing = None
    if (
        existing is not None
        and stat.S_ISREG(existing.st_mode)
        and existing.st_size == size
        and _sha256_of(spool_path) == sha256
    ):
        tmp_path.unlink()
        return
    os.replace(tmp_path, spool_path)
    if not sync:
        return
    dir_fd = os.open(spool_path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _with_proxy(
    result: Inspected, spool_dir: Path, max_side: int, max_pixels: int | None, timeout: float
) -> Inspection:
    """``result``, its proxy made in the spool; or the refusal of a file whose proxy
    cannot be made (its spooled copy removed)."""
    try:
        make_proxy(
            result.spool_path,
            spool_dir / proxy_name(result.sha256, max_side),
            max_side=max_side,
            max_pixels=max_pixels,
            timeout=timeout,
            sync=False,  # (the batch's sync_spool makes it durable before its job is queued)
        )
    except DecodeError as exc:
        result.spool_path.unlink(missing_ok=True)
        return Refused(
            result.rel_path,
            exc.status,
            exc.code,
            exc.detail,
            result.sha256,
            result.size,
            result.mtime_ns,
            result.inode,
            result.device,
            result.ctime_ns,
        )
    return result


INSPECT_SLICE_SECONDS = 0.2  # a batch's results are handed back at least this often


def inspect_some(
    rels: list[str],
    inbox: Path,
    spool_dir: Path,
    max_bytes: int,
    max_pixels: int | None = None,
    *,
    capture: bool = False,
    per_file: Callable[[str], AbstractContextManager[object]] | None = None,
    decode_timeout: float = DEFAULT_DECODE_TIMEOUT_SECONDS,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    max_upload_bytes: int | None = None,
    multi_frame: MultiFrame = "first",
    api_formats_only: bool = False,
    proxy_max_side: int | None = None,
) -> tuple[list[Inspection | Exception], list[Note]]:
    """Inspect ``rels`` in order until done or the time slice is used up; an exception is
    returned in place of its file's result. Runs in a worker thread or process.

    ``capture=True`` (in a worker process only: see :class:`dropcut.capture.Capture`) also returns, as
    :class:`Note` s naming their file, the warnings, log records and stdout/stderr output
    that would otherwise go to the worker's stderr, unformatted.  Otherwise they take
    their usual way (the daemon's logging) and no notes are returned; ``per_file(rel)`` is
    a context each file is inspected in (the daemon binds the file to its log events).
    ``decode_timeout`` (seconds) and ``max_decode_bytes`` bound each file's decode check;
    ``max_upload_bytes``, ``multi_frame`` and ``api_formats_only`` are the API mode's
    limits (see :func:`inspect_file`). With ``proxy_max_side`` (matte mode) the proxy of an
    admitted image larger than it is made here too (:func:`dropcut.decode.make_proxy`, into the spool as
    :func:`dropcut.paths.proxy_name`), off the request's path: a file whose proxy cannot
    be made is refused like one that does not decode."""
    out: list[Inspection | Exception] = []
    until = time.monotonic() + INSPECT_SLICE_SECONDS
    with Capture() if capture else contextlib.nullcontext() as captured:
        for rel in rels:
            if captured is not None:
                context: AbstractContextManager[object] = captured.file(rel)
            elif per_file is not None:
                context = per_file(rel)
            else:
                context = contextlib.nullcontext()
            with context:
                try:
                    result = inspect_file(
                        inbox,
                        rel,
                        spool_dir=spool_dir,
                        max_bytes=max_bytes,
                        max_pixels=max_pixels,
                        sync=False,
                        decode_timeout=decode_timeout,
                        max_decode_bytes=max_decode_bytes,
                        max_upload_bytes=max_upload_bytes,
                        multi_frame=multi_frame,
                        api_formats_only=api_formats_only,
                    )
                    # A photo larger than its proxy: made here, off the request's path (a
                    # decode and a resize); a small image's proxy costs little at send time.
                    if (
                        proxy_max_side is not None
                        and isinstance(result, Inspected)
                        and max(result.width, result.height) > proxy_max_side
                    ):
                        result = _with_proxy(result, spool_dir, proxy_max_side, max_pixels, decode_timeout)
                    out.append(result)
                except Exception as exc:
                    out.append(exc)
            if time.monotonic() >= until:
                break
        # Durable before the caller records them: one syncfs for the batch, not two fsyncs a file.
        sync_spool(spool_dir)
    return out, (captured.notes if captured is not None else [])
