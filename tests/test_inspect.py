"""Tests for dropcut.inspect, on real files in tmp_path (images made with Pillow)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import os
import random
import signal
import socket
import stat
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image

from dropcut.inspect import (
    Changed,
    Inspected,
    Refused,
    Rejected,
    Unreadable,
    Vanished,
    describe_content,
    inspect_file,
    open_dir_nofollow,
    sniff_format,
    stat_entry,
)

MAX = 10_000_000
OLD_ATIME_NS = 1_000_000_000 * 10**9  # 2001-09-09


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def noise(size: tuple[int, int], mode: str = "RGB", seed: int = 1) -> Image.Image:
    bands = len(Image.new(mode, (1, 1)).getbands())
    rnd = random.Random(seed)
    return Image.frombytes(mode, size, rnd.randbytes(size[0] * size[1] * bands))


def encode(fmt: str, size: tuple[int, int] = (64, 48), **params: object) -> bytes:
    buf = io.BytesIO()
    noise(size).save(buf, format=fmt, **params)
    return buf.getvalue()


def png_chunks(width: int, height: int, idat: bytes) -> bytes:
    """A minimal 1-bit greyscale PNG with the given header size and raw scanline data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(idat))
        + chunk(b"IEND", b"")
    )


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    path = tmp_path / "inbox"
    path.mkdir()
    return path


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    path = tmp_path / "spool"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside"
    path.mkdir()
    return path


@pytest.fixture
def atime_works(tmp_path: Path) -> bool:
    """Whether reading a file visibly updates its atime here (relatime: yes, noatime: no)."""
    probe = tmp_path / "atime-probe"
    probe.write_bytes(b"x")
    os.utime(probe, ns=(OLD_ATIME_NS, OLD_ATIME_NS))
    probe.read_bytes()
    return os.stat(probe).st_atime_ns != OLD_ATIME_NS


def make_never_read_guard(path: Path, atime_works: bool) -> Callable[[], None]:
    """Age ``path``'s atime; the returned check asserts nobody has read it since."""
    os.utime(path, ns=(OLD_ATIME_NS, OLD_ATIME_NS))

    def check() -> None:
        if atime_works:
            assert os.stat(path).st_atime_ns == OLD_ATIME_NS, f"{path} was read"

    return check


def inspect(inbox: Path, rel: str, spool: Path, max_bytes: int = MAX) -> object:
    return inspect_file(inbox, rel, spool_dir=spool, max_bytes=max_bytes)


def spool_names(spool: Path) -> list[str]:
    return sorted(p.name for p in spool.iterdir())


# ---------------------------------------------------------------------------------------
# accepted images
# ---------------------------------------------------------------------------------------

FORMATS = [
    ("JPEG", "jpg", {"quality": 90}),
    ("PNG", "png", {}),
    ("WEBP", "webp", {"quality": 80}),
    ("TIFF", "tif", {}),
    ("BMP", "bmp", {}),
    ("GIF", "gif", {}),
]


@pytest.mark.parametrize(("fmt", "ext", "params"), FORMATS, ids=[f for f, _, _ in FORMATS])
def test_each_format_is_accepted(
    inbox: Path, spool: Path, fmt: str, ext: str, params: dict[str, object]
) -> None:
    data = encode(fmt, (64, 48), **params)
    path = inbox / f"photo.{ext}"
    path.write_bytes(data)
    st = os.stat(path)

    result = inspect(inbox, f"photo.{ext}", spool)

    assert result == Inspected(
        rel_path=f"photo.{ext}",
        sha256=sha(data),
        size=len(data),
        mtime_ns=st.st_mtime_ns,
        inode=st.st_ino,
        device=st.st_dev,
        format=fmt,
        width=64,
        height=48,
        spool_path=spool / sha(data),
        ctime_ns=st.st_ctime_ns,
    )
    assert (spool / sha(data)).read_bytes() == data
    assert spool_names(spool) == [sha(data)]  # no temp file left over
    assert path.read_bytes() == data  # the inbox file is untouched


def test_extension_is_ignored_content_decides(inbox: Path, spool: Path) -> None:
    data = encode("PNG")
    (inbox / "really-a-png.jpg").write_bytes(data)
    (inbox / "no-extension").write_bytes(data)
    for rel in ("really-a-png.jpg", "no-extension"):
        result = inspect(inbox, rel, spool)
        assert isinstance(result, Inspected)
        assert result.format == "PNG"


def test_odd_names_and_nested_dirs(inbox: Path, spool: Path) -> None:
    rel = "album 2024/Ünï cødé/фото\n1 (copy).jpg"
    data = encode("JPEG")
    (inbox / rel).parent.mkdir(parents=True)
    (inbox / rel).write_bytes(data)
    result = inspect(inbox, rel, spool)
    assert isinstance(result, Inspected)
    assert result.rel_path == rel
    assert result.sha256 == sha(data)


def test_large_jpeg_reports_full_size_not_draft_size(inbox: Path, spool: Path) -> None:
    data = encode("JPEG", (640, 480), quality=85)
    (inbox / "big.jpg").write_bytes(data)
    result = inspect(inbox, "big.jpg", spool)
    assert isinstance(result, Inspected)
    assert (result.width, result.height) == (640, 480)


def test_tiny_jpeg_draft_does_not_divide_by_zero(inbox: Path, spool: Path) -> None:
    data = encode("JPEG", (3, 2))
    (inbox / "tiny.jpg").write_bytes(data)
    result = inspect(inbox, "tiny.jpg", spool)
    assert isinstance(result, Inspected)
    assert (result.width, result.height) == (3, 2)


def test_animated_gif_is_accepted(inbox: Path, spool: Path) -> None:
    frames = [noise((32, 32), seed=i).convert("P") for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    (inbox / "anim.gif").write_bytes(buf.getvalue())
    result = inspect(inbox, "anim.gif", spool)
    assert isinstance(result, Inspected)
    assert result.format == "GIF"


def test_same_content_twice_shares_one_spool_file(inbox: Path, spool: Path) -> None:
    data = encode("PNG")
    (inbox / "a.png").write_bytes(data)
    (inbox / "b.png").write_bytes(data)
    first = inspect(inbox, "a.png", spool)
    spool_inode = os.stat(spool / sha(data)).st_ino
    second = inspect(inbox, "b.png", spool)
    assert isinstance(first, Inspected)
    assert isinstance(second, Inspected)
    assert first.spool_path == second.spool_path
    assert spool_names(spool) == [sha(data)]
    assert os.stat(spool / sha(data)).st_ino == spool_inode  # kept, temp dropped


def test_damaged_spool_file_is_replaced(inbox: Path, spool: Path) -> None:
    data = encode("PNG")
    (inbox / "a.png").write_bytes(data)
    (spool / sha(data)).write_bytes(b"half a file")
    result = inspect(inbox, "a.png", spool)
    assert isinstance(result, Inspected)
    assert (spool / sha(data)).read_bytes() == data
    assert spool_names(spool) == [sha(data)]


# ---------------------------------------------------------------------------------------
# refused: empty, too large, unsupported, corrupt
# ---------------------------------------------------------------------------------------


def test_empty(inbox: Path, spool: Path) -> None:
    (inbox / "empty.jpg").write_bytes(b"")
    result = inspect(inbox, "empty.jpg", spool)
    assert isinstance(result, Refused)
    assert (result.status, result.code) == (422, "empty")
    assert result.sha256 == sha(b"")
    assert result.size == 0
    assert spool_names(spool) == []


def test_too_large_hashes_whole_file_and_leaves_no_spool(inbox: Path, spool: Path) -> None:
    data = encode("PNG", (64, 64))
    (inbox / "big.png").write_bytes(data)
    st = os.stat(inbox / "big.png")
    limit = len(data) - 1
    result = inspect(inbox, "big.png", spool, max_bytes=limit)
    assert result == Refused(
        rel_path="big.png",
        status=413,
        code="too_large",
        detail=f"the file is {len(data)} bytes, over the limit of {limit} bytes",
        sha256=sha(data),
        size=len(data),
        mtime_ns=st.st_mtime_ns,
        inode=st.st_ino,
        device=st.st_dev,
        ctime_ns=st.st_ctime_ns,
    )
    assert spool_names(spool) == []


def test_exactly_max_bytes_is_accepted(inbox: Path, spool: Path) -> None:
    data = encode("PNG")
    (inbox / "edge.png").write_bytes(data)
    assert isinstance(inspect(inbox, "edge.png", spool, max_bytes=len(data)), Inspected)


UNSUPPORTED = [
    ("pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "PDF document"),
    ("mp4", b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + bytes(64), "MP4 video"),
    ("zip", b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(40), "ZIP archive"),
    ("text", b"hello, this is not an image\n", "text"),
    ("binary", b"\x00\x01\x02\x03\xfe\xfd" * 20, "unknown"),
]


@pytest.mark.parametrize(
    ("data", "looks_like"),
    [(d, k) for _, d, k in UNSUPPORTED],
    ids=[i for i, _, _ in UNSUPPORTED],
)
def test_unsupported_format(inbox: Path, spool: Path, data: bytes, looks_like: str) -> None:
    (inbox / "photo.jpg").write_bytes(data)
    result = inspect(inbox, "photo.jpg", spool)
    assert isinstance(result, Refused)
    assert (result.status, result.code) == (415, "unsupported_format")
    assert f"looks like: {looks_like})" in result.detail
    assert result.sha256 == sha(data)
    assert spool_names(spool) == []


HEIF_HEADS = [  # content says HEIF/AVIF, but there is no image behind it
    ("heic", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), "HEIC"),
    ("heif-mif1", b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1heic" + bytes(64), "HEIC"),
    ("avif", b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + bytes(64), "AVIF"),
]


@pytest.mark.parametrize(
    ("data", "looks_like"), [(d, k) for _, d, k in HEIF_HEADS], ids=[i for i, _, _ in HEIF_HEADS]
)
def test_heif_and_avif_are_supported_formats_but_must_decode(
    inbox: Path, spool: Path, data: bytes, looks_like: str
) -> None:
    (inbox / "photo.heic").write_bytes(data)
    result = inspect(inbox, "photo.heic", spool)
    assert isinstance(result, Refused)
    assert (result.status, result.code) == (422, "corrupt_image")
    # cutout mode uploads the file as it is: the API takes no HEIF/AVIF, refused first
    cutout = inspect_file(inbox, "photo.heic", spool_dir=spool, max_bytes=MAX, api_formats_only=True)
    assert isinstance(cutout, Refused)
    assert (cutout.status, cutout.code) == (415, "unsupported_format")
    assert f"a {looks_like} image" in cutout.detail and 'api_mode = "matte"' in cutout.detail
    assert spool_names(spool) == []


TRUNCATED = [
    ("jpeg-half", lambda: encode("JPEG", (256, 192))[:-6000]),
    ("jpeg-no-eoi", lambda: encode("JPEG", (256, 192))[:-2]),
    ("jpeg-progressive-half", lambda: encode("JPEG", (256, 192), progressive=True)[:-6000]),
    ("png-half", lambda: encode("PNG", (128, 96))[:-15000]),
    ("gif-half", lambda: encode("GIF", (128, 96))[:-3000]),
    ("tiff-half", lambda: encode("TIFF", (64, 48))[:4000]),
]
TIFF_WITHOUT_IFD = pytest.param(  # the IFD is at the end of an LZW TIFF: cut it off
    lambda: encode("TIFF", (64, 48), compression="tiff_lzw")[:-200],
    id="tiff-lzw-no-ifd",
    marks=pytest.mark.filterwarnings("ignore:Corrupt EXIF data"),
)


@pytest.mark.parametrize("make", [pytest.param(m, id=i) for i, m in TRUNCATED] + [TIFF_WITHOUT_IFD])
def test_truncated_is_corrupt(inbox: Path, spool: Path, make: Callable[[], bytes]) -> None:
    data = make()
    (inbox / "cut.img").write_bytes(data)
    result = inspect(inbox, "cut.img", spool)
    assert isinstance(result, Refused), result
    assert (result.status, result.code) == (422, "corrupt_image")
    assert result.detail.startswith("cannot decode as ")
    assert str(spool) not in result.detail
    assert result.sha256 == sha(data)
    assert spool_names(spool) == []


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_pillow_draft_still_detects_truncation(progressive: bool) -> None:
    """The assumption inspect relies on: draft() decodes at 1/8 scale yet still parses
    the whole entropy-coded stream, so a truncated JPEG fails to load."""
    whole = encode("JPEG", (640, 480), quality=90, progressive=progressive)
    for cut in (whole[: len(whole) // 2], whole[:-100]):
        with Image.open(io.BytesIO(cut)) as img:
            assert img.draft("RGB", (80, 60)) is not None
            assert img.size == (80, 60)  # draft is in effect
            with pytest.raises(OSError, match="truncated"):
                img.load()
    with Image.open(io.BytesIO(whole)) as img:  # and the complete file loads
        img.draft("RGB", (80, 60))
        img.load()


def test_decompression_bomb_is_too_many_pixels(inbox: Path, spool: Path) -> None:
    (inbox / "bomb.png").write_bytes(png_chunks(20_000, 10_000, b""))
    result = inspect(inbox, "bomb.png", spool)
    assert isinstance(result, Refused)
    assert (result.status, result.code) == (422, "too_many_pixels")
    assert spool_names(spool) == []


@pytest.mark.parametrize(("fmt", "ext", "params"), FORMATS, ids=[f for f, _, _ in FORMATS])
@pytest.mark.parametrize(("max_pixels", "refused"), [(64 * 48 - 1, True), (64 * 48, False)])
def test_max_pixels_is_the_last_pixel_allowed(
    inbox: Path, spool: Path, fmt: str, ext: str, params: dict[str, object], max_pixels: int, refused: bool
) -> None:
    data = encode(fmt, (64, 48), **params)
    (inbox / f"photo.{ext}").write_bytes(data)
    result = inspect_file(inbox, f"photo.{ext}", spool_dir=spool, max_bytes=MAX, max_pixels=max_pixels)
    if refused:
        assert isinstance(result, Refused)
        assert (result.status, result.code) == (422, "too_many_pixels")
        assert result.detail == f"64x48 is 3072 pixels, over the limit of {max_pixels} (max_pixels)"
        assert spool_names(spool) == []
    else:
        assert isinstance(result, Inspected)
        assert (result.width, result.height) == (64, 48)


def test_max_pixels_refuses_from_the_header_before_decoding(inbox: Path, spool: Path) -> None:
    # 60 Mpx with an empty IDAT: decoding would say corrupt_image (after allocating 180 MB);
    # over max_pixels it is refused from the header alone.
    (inbox / "huge.png").write_bytes(png_chunks(10_000, 6_000, b""))
    result = inspect_file(inbox, "huge.png", spool_dir=spool, max_bytes=MAX, max_pixels=50_000_000)
    assert isinstance(result, Refused)
    assert (result.status, result.code) == (422, "too_many_pixels")
    assert "10000x6000 is 60000000 pixels" in result.detail
    under = inspect_file(inbox, "huge.png", spool_dir=spool, max_bytes=MAX, max_pixels=60_000_000)
    assert isinstance(under, Refused) and under.code == "corrupt_image"


@pytest.mark.filterwarnings("error")
def test_decompression_bomb_warning_is_not_a_refusal(inbox: Path, spool: Path) -> None:
    # 90 Mpx: over Pillow's warning limit, under its error limit.  The IDAT is empty so
    # the image is corrupt; what matters is that the warning did not decide the outcome,
    # even with warnings turned into errors.
    data = png_chunks(10_000, 9_000, b"")
    with pytest.raises(Image.DecompressionBombWarning):
        Image.open(io.BytesIO(data))
    (inbox / "big.png").write_bytes(data)
    result = inspect(inbox, "big.png", spool)
    assert isinstance(result, Refused)
    assert result.code == "corrupt_image"
    assert "decompression" not in result.detail.lower()


# ---------------------------------------------------------------------------------------
# rejected: links, special files; the target outside is never opened
# ---------------------------------------------------------------------------------------


def test_symlinked_file_is_rejected_and_target_never_read(
    inbox: Path, spool: Path, outside: Path, atime_works: bool
) -> None:
    target = outside / "secret.jpg"
    target.write_bytes(encode("JPEG"))
    never_read = make_never_read_guard(target, atime_works)
    (inbox / "photo.jpg").symlink_to(target)

    assert inspect(inbox, "photo.jpg", spool) == Rejected("photo.jpg", "symbolic_link")
    never_read()
    assert spool_names(spool) == []


@pytest.mark.parametrize("rel", ["sub/secret.jpg", "a/sub/secret.jpg", "a/sub/deeper/secret.jpg"])
def test_symlinked_directory_component_is_rejected(
    inbox: Path, spool: Path, outside: Path, atime_works: bool, rel: str
) -> None:
    (outside / "deeper").mkdir()
    for target in (outside / "secret.jpg", outside / "deeper" / "secret.jpg"):
        target.write_bytes(encode("JPEG"))
    guards = [
        make_never_read_guard(outside / "secret.jpg", atime_works),
        make_never_read_guard(outside / "deeper" / "secret.jpg", atime_works),
    ]
    (inbox / "a").mkdir()
    (inbox / "sub").symlink_to(outside, target_is_directory=True)
    (inbox / "a" / "sub").symlink_to(outside, target_is_directory=True)

    assert inspect(inbox, rel, spool) == Rejected(rel, "symbolic_link")
    for never_read in guards:
        never_read()
    assert spool_names(spool) == []


@pytest.mark.timeout(5)
def test_symlink_to_fifo_outside_is_rejected_without_blocking(
    inbox: Path, spool: Path, outside: Path
) -> None:
    os.mkfifo(outside / "trap")
    (inbox / "photo.jpg").symlink_to(outside / "trap")
    (inbox / "dir").symlink_to(outside, target_is_directory=True)
    assert inspect(inbox, "photo.jpg", spool) == Rejected("photo.jpg", "symbolic_link")
    assert inspect(inbox, "dir/trap", spool) == Rejected("dir/trap", "symbolic_link")


def test_dangling_and_directory_symlinks_are_rejected(inbox: Path, spool: Path) -> None:
    (inbox / "dangling.jpg").symlink_to(inbox / "nowhere.jpg")
    (inbox / "loop.jpg").symlink_to(inbox / "loop.jpg")
    (inbox / "real").mkdir()
    (inbox / "dirlink.jpg").symlink_to(inbox / "real", target_is_directory=True)
    for rel in ("dangling.jpg", "loop.jpg", "dirlink.jpg"):
        assert inspect(inbox, rel, spool) == Rejected(rel, "symbolic_link")


def test_hard_links_are_rejected(inbox: Path, spool: Path, outside: Path, atime_works: bool) -> None:
    secret = outside / "secret.jpg"
    secret.write_bytes(encode("JPEG"))
    never_read = make_never_read_guard(secret, atime_works)
    os.link(secret, inbox / "looks-innocent.jpg")
    (inbox / "a.jpg").write_bytes(encode("JPEG"))
    os.link(inbox / "a.jpg", inbox / "b.jpg")

    for rel in ("looks-innocent.jpg", "a.jpg", "b.jpg"):
        assert inspect(inbox, rel, spool) == Rejected(rel, "hard_link")
    never_read()
    assert spool_names(spool) == []


@pytest.mark.timeout(5)
def test_fifo_is_rejected_without_blocking(inbox: Path, spool: Path) -> None:
    os.mkfifo(inbox / "photo.jpg")
    assert inspect(inbox, "photo.jpg", spool) == Rejected("photo.jpg", "not_regular_file")


def test_socket_is_rejected(inbox: Path, spool: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(inbox / "photo.jpg"))
        assert inspect(inbox, "photo.jpg", spool) == Rejected("photo.jpg", "not_regular_file")


def test_device_is_rejected(inbox: Path, spool: Path) -> None:
    try:
        os.mknod(inbox / "null.jpg", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD")
    assert inspect(inbox, "null.jpg", spool) == Rejected("null.jpg", "not_regular_file")


def test_directory_is_rejected(inbox: Path, spool: Path) -> None:
    (inbox / "photo.jpg").mkdir()
    assert inspect(inbox, "photo.jpg", spool) == Rejected("photo.jpg", "not_regular_file")


# ---------------------------------------------------------------------------------------
# unreadable, vanished, changed
# ---------------------------------------------------------------------------------------


@pytest.fixture
def permissions_enforced(tmp_path: Path) -> None:
    """Skip unless chmod 000 really denies this process (root with CAP_DAC_OVERRIDE, the
    usual way these tests are run in containers, reads anything)."""
    probe = tmp_path / "permission-probe"
    probe.write_bytes(b"x")
    probe.chmod(0)
    try:
        probe.read_bytes()
    except PermissionError:
        return
    finally:
        probe.chmod(0o600)
    pytest.skip(
        f"euid {os.geteuid()} can read a mode-000 file (root / CAP_DAC_OVERRIDE), so EACCES "
        "cannot be provoked; Unreadable is covered by the lease test"
    )


@pytest.mark.usefixtures("permissions_enforced")
@pytest.mark.parametrize("what", ["file", "directory"])
def test_permission_denied_is_unreadable(inbox: Path, spool: Path, what: str) -> None:
    (inbox / "sub").mkdir()
    (inbox / "sub" / "photo.jpg").write_bytes(encode("JPEG"))
    locked = inbox / "sub" if what == "directory" else inbox / "sub" / "photo.jpg"
    locked.chmod(0)
    try:
        result = inspect(inbox, "sub/photo.jpg", spool)
    finally:
        locked.chmod(0o700)
    assert isinstance(result, Unreadable)
    assert result.errno_name == "EACCES"
    assert spool_names(spool) == []


@pytest.fixture
def sigio_ignored() -> Iterator[None]:
    previous = signal.signal(signal.SIGIO, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGIO, previous)


@pytest.mark.timeout(5)
@pytest.mark.usefixtures("sigio_ignored")
def test_file_under_a_lease_is_unreadable_not_waited_for(inbox: Path, spool: Path) -> None:
    """Samba holds kernel leases (oplocks); O_NONBLOCK makes open() fail with EAGAIN
    instead of waiting up to lease-break-time (45 s).  Works as root too."""
    path = inbox / "photo.jpg"
    path.write_bytes(encode("JPEG"))
    holder = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.fcntl(holder, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        except OSError as err:
            pytest.skip(f"leases not available here: {err}")
        result = inspect(inbox, "photo.jpg", spool)
        fcntl.fcntl(holder, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    finally:
        os.close(holder)
    assert isinstance(result, Unreadable)
    assert result.errno_name == errno.errorcode[errno.EAGAIN]
    assert spool_names(spool) == []
    assert isinstance(inspect(inbox, "photo.jpg", spool), Inspected)  # retry works


@pytest.mark.parametrize("rel", ["missing.jpg", "missing-dir/photo.jpg", "file.jpg/photo.jpg", "a/b/c.jpg"])
def test_vanished(inbox: Path, spool: Path, rel: str) -> None:
    (inbox / "file.jpg").write_bytes(encode("JPEG"))
    (inbox / "a").mkdir()
    assert inspect(inbox, rel, spool) == Vanished(rel)


def test_missing_inbox_is_vanished(tmp_path: Path, spool: Path) -> None:
    assert inspect(tmp_path / "no-inbox", "photo.jpg", spool) == Vanished("photo.jpg")


@pytest.mark.timeout(10)
def test_file_growing_while_read_is_changed(inbox: Path, spool: Path) -> None:
    path = inbox / "growing.jpg"
    path.write_bytes(encode("JPEG") + bytes(8 << 20))
    stop = threading.Event()
    started = threading.Event()

    def append() -> None:
        with path.open("ab", buffering=0) as out:
            while not stop.is_set():
                out.write(b"\xff" * 4096)
                started.set()
                stop.wait(0.0005)

    writer = threading.Thread(target=append)
    writer.start()
    results = []
    try:
        assert started.wait(2)
        for _ in range(5):
            results.append(inspect(inbox, "growing.jpg", spool))
            if isinstance(results[-1], Changed):
                break
    finally:
        stop.set()
        writer.join()
    assert Changed("growing.jpg") in results
    assert spool_names(spool) == []


INVALID_RELS = [
    "../escape.jpg",
    "a/../../escape.jpg",
    "/etc/passwd",
    "a//b.jpg",
    "./a.jpg",
    "",
    "a/",
    "nul\x00.jpg",
    "..",
]


@pytest.mark.parametrize("rel", INVALID_RELS, ids=[repr(r) for r in INVALID_RELS])
def test_rel_path_that_could_escape_is_a_caller_bug(inbox: Path, spool: Path, rel: str) -> None:
    with pytest.raises(ValueError, match="plain relative path"):
        inspect(inbox, rel, spool)
    with pytest.raises(ValueError, match="plain relative path"):
        stat_entry(inbox, rel)


# ---------------------------------------------------------------------------------------
# stat_entry, open_dir_nofollow, the file's identity
# ---------------------------------------------------------------------------------------


def test_stat_entry(inbox: Path, outside: Path) -> None:
    (inbox / "d").mkdir()
    (inbox / "d" / "photo.jpg").write_bytes(b"abc")
    (inbox / "link.jpg").symlink_to(outside / "whatever")
    (inbox / "dirlink").symlink_to(outside, target_is_directory=True)

    st = stat_entry(inbox, "d/photo.jpg")
    assert st is not None
    assert (st.st_ino, st.st_size) == (os.stat(inbox / "d" / "photo.jpg").st_ino, 3)

    link = stat_entry(inbox, "link.jpg")
    assert link is not None and stat.S_ISLNK(link.st_mode)
    via_dir_link = stat_entry(inbox, "dirlink/x.jpg")
    assert via_dir_link is not None and stat.S_ISLNK(via_dir_link.st_mode)
    assert via_dir_link.st_ino == os.lstat(inbox / "dirlink").st_ino

    assert stat_entry(inbox, "nope.jpg") is None
    assert stat_entry(inbox, "nope/x.jpg") is None
    assert stat_entry(inbox, "d/photo.jpg/x.jpg") is None


def test_open_dir_nofollow(inbox: Path, outside: Path) -> None:
    (inbox / "a" / "b").mkdir(parents=True)
    (inbox / "a" / "link").symlink_to(outside, target_is_directory=True)
    for rel, expected in (("", inbox), (".", inbox), ("a/b", inbox / "a" / "b")):
        fd = open_dir_nofollow(inbox, rel)
        try:
            assert os.fstat(fd).st_ino == os.stat(expected).st_ino
        finally:
            os.close(fd)
    for rel in ("a/link", "a/link/x"):
        with pytest.raises(OSError) as info:
            open_dir_nofollow(inbox, rel)
        assert info.value.errno in (errno.ELOOP, errno.ENOTDIR)
    with pytest.raises(FileNotFoundError):
        open_dir_nofollow(inbox, "a/missing")


def _identity(inbox: Path, spool: Path, rel: str) -> tuple[int, int, int, int, int]:
    """(size, mtime, ctime, inode, device) as inspection recorded them for the job."""
    result = inspect(inbox, rel, spool)
    assert isinstance(result, Inspected)
    return (result.size, result.mtime_ns, result.ctime_ns, result.inode, result.device)


def _touch(path: Path, side: Path) -> None:
    os.utime(path, ns=(1, 1))


def _append(path: Path, side: Path) -> None:
    with path.open("ab") as out:
        out.write(b"x")


def _unlink(path: Path, side: Path) -> None:
    path.unlink()


def _replace_with_identical_copy(path: Path, side: Path) -> None:
    """New inode, same bytes, same mtime (what `cp -p` + rename, or rsync -t, does)."""
    st = os.stat(path)
    (side / "new").write_bytes(path.read_bytes())
    os.utime(side / "new", ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(side / "new", path)


def _replace_with_link_to_itself(path: Path, side: Path) -> None:
    os.replace(path, side / "moved")
    path.symlink_to(side / "moved")


IDENTITY_CHANGES: list[tuple[str, Callable[[Path, Path], None] | None, bool]] = [
    ("unchanged", None, True),
    ("touched", _touch, False),
    ("appended", _append, False),
    ("vanished", _unlink, False),
    ("replaced-same-bytes-and-mtime", _replace_with_identical_copy, False),
    ("replaced-by-link-to-itself", _replace_with_link_to_itself, False),
]


@pytest.mark.parametrize(
    ("change", "expected"),
    [(c, e) for _, c, e in IDENTITY_CHANGES],
    ids=[i for i, _, _ in IDENTITY_CHANGES],
)
def test_the_file_is_still_the_one_inspected(
    inbox: Path,
    spool: Path,
    change: Callable[[Path, Path], None] | None,
    expected: bool,
) -> None:
    """What the dispatcher asks before it spends anything on a job, and before it moves an
    input (:meth:`dropcut.publish.Publisher.source_state`, signature with the ctime)."""
    from dropcut.paths import Layout
    from dropcut.publish import Publisher

    path = inbox / "photo.png"
    path.write_bytes(encode("PNG"))
    identity = _identity(inbox, spool, "photo.png")
    side = inbox / "side"  # same file system, so os.replace works
    side.mkdir()
    if change is not None:
        change(path, side)
    publisher = Publisher(Layout(inbox, side, side, side, spool), on_success="archive", clock=lambda: 0.0)
    assert publisher.identity_matches("photo.png", identity) is expected


# ---------------------------------------------------------------------------------------
# sniffing (pure)
# ---------------------------------------------------------------------------------------

SNIFF = [
    ("jpeg", b"\xff\xd8\xff\xe0\x00\x10JFIF", "JPEG"),
    ("jpeg-exif", b"\xff\xd8\xff\xe1\x12\x34Exif", "JPEG"),
    ("png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "PNG"),
    ("webp", b"RIFF\x24\x00\x00\x00WEBPVP8 ", "WEBP"),
    ("tiff-le", b"II*\x00\x08\x00\x00\x00", "TIFF"),
    ("tiff-be", b"MM\x00*\x00\x00\x00\x08", "TIFF"),
    ("bmp", b"BM\x36\x00\x0c\x00\x00\x00", "BMP"),
    ("gif87", b"GIF87a\x01\x00", "GIF"),
    ("gif89", b"GIF89a\x01\x00", "GIF"),
    ("jpeg-2-bytes-only", b"\xff\xd8", None),
    ("png-signature-broken", b"\x89PNG\r\n\x1a\x00", None),
    ("riff-wave", b"RIFF\x24\x00\x00\x00WAVEfmt ", None),
    ("riff-short", b"RIFF\x24\x00\x00\x00WEB", None),
    ("bigtiff", b"II+\x00\x08\x00\x00\x00", None),
    ("gif-other-version", b"GIF90a", None),
    ("pdf", b"%PDF-1.4", None),
    ("heic", b"\x00\x00\x00\x18ftypheic", "HEIF"),
    ("heic-compat", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "HEIF"),
    ("heif-mif1", b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1heic", "HEIF"),
    ("avif", b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf", "AVIF"),
    ("avif-sequence", b"\x00\x00\x00\x1cftypavis\x00\x00\x00\x00avisavifmif1", "AVIF"),
    ("mif1-with-avif-compat", b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1avifmiaf", "AVIF"),
    ("avif-brand-past-box-end", b"\x00\x00\x00\x14ftypmif1\x00\x00\x00\x00mif1avif", "HEIF"),
    ("cr3-is-raw-not-heif", b"\x00\x00\x00\x18ftypcrx \x00\x00\x00\x01crx isom", None),
    ("mp4", b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2", None),
    ("ftyp-cut-short", b"\x00\x00\x00\x18ftyp", None),
    ("empty", b"", None),
]


@pytest.mark.parametrize(("head", "expected"), [(h, e) for _, h, e in SNIFF], ids=[i for i, _, _ in SNIFF])
def test_sniff_format(head: bytes, expected: str | None) -> None:
    assert sniff_format(head) == expected


DESCRIBE = [
    ("pdf", b"%PDF-1.4\n", "PDF document"),
    ("heic", b"\x00\x00\x00\x18ftypheic\x00\x00", "HEIC"),
    ("heif-mif1", b"\x00\x00\x00\x1cftypmif1\x00\x00", "HEIC"),
    ("avif", b"\x00\x00\x00\x1cftypavif\x00\x00", "AVIF"),
    ("cr3", b"\x00\x00\x00\x18ftypcrx \x00\x00\x00\x01crx isom", "Canon CR3 raw"),
    ("mp4", b"\x00\x00\x00\x20ftypisom\x00\x00", "MP4 video"),
    ("mov", b"\x00\x00\x00\x14ftypqt  \x00\x00", "QuickTime video"),
    ("zip", b"PK\x03\x04\x14\x00", "ZIP archive"),
    ("psd", b"8BPS\x00\x01", "Photoshop document"),
    ("bigtiff", b"II+\x00\x08\x00", "BigTIFF"),
    ("jxl", b"\xff\x0a\xfa", "JPEG XL"),
    ("wave", b"RIFF\x24\x00\x00\x00WAVEfmt ", "RIFF container (WAVE)"),
    ("svg", b"\xef\xbb\xbf<svg xmlns='http://www.w3.org/2000/svg'>", "SVG image"),
    ("html", b"<!DOCTYPE html><html>", "HTML document"),
    ("text", b"just some notes\n", "text"),
    ("utf8-cut-mid-char", "caf\u00e9".encode()[:-1], "text"),
    ("binary", b"\x00\x01\x02\xff", "unknown"),
    ("latin1", b"caf\xe9 au lait", "unknown"),
    ("supported", b"\xff\xd8\xff\xe0", "JPEG"),
]


@pytest.mark.parametrize(
    ("head", "expected"), [(h, e) for _, h, e in DESCRIBE], ids=[i for i, _, _ in DESCRIBE]
)
def test_describe_content(head: bytes, expected: str) -> None:
    assert describe_content(head) == expected
