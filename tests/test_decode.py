"""dropcut.decode: a file -> the image a person sees (the proxy and the full image), and
inspection's new refusals (camera raw, multi-frame, upload size) -- on real files built in
tmp_path by tests/photos.py."""

from __future__ import annotations

import functools
import io
import json
import multiprocessing
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dropcut import decode
from dropcut.decode import DecodeError, FullImage, Proxy, load_full, make_proxy
from dropcut.inspect import Inspected, Refused, inspect_file, inspect_some
from tests import photos

MiB = 1024 * 1024
MAX_FILE = 256 * MiB  # settings.max_file_bytes
API_LIMIT = 10 * MiB  # settings.api_max_upload_bytes


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    (tmp_path / "inbox").mkdir()
    return tmp_path / "inbox"


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    (tmp_path / "spool").mkdir()
    return tmp_path / "spool"


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 MP, ~19 MB: a high-ISO camera JPEG (built once, ~2 s)."""
    return photos.big_jpeg(tmp_path_factory.mktemp("big") / "DSC_0001.JPG")


def inspect(inbox: Path, spool: Path, rel: str, **kwargs: object) -> object:
    return inspect_file(inbox, rel, spool_dir=spool, max_bytes=MAX_FILE, **kwargs)  # type: ignore[arg-type]


def pixel(img: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    value = img.getpixel(xy)
    assert isinstance(value, tuple)
    return value


def close_to(actual: tuple[float, ...], expected: tuple[float, ...], tolerance: float) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


# --- pure helpers, table-driven -------------------------------------------------------------------

FIT = [
    ((6000, 4000), 1024, (1024, 683)),
    ((4000, 6000), 1024, (683, 1024)),
    ((1024, 1024), 1024, (1024, 1024)),
    ((800, 600), 1024, (800, 600)),  # never upscaled
    ((20000, 10), 1024, (1024, 1)),  # at least 1
    ((1025, 1), 1024, (1024, 1)),
    ((3000, 2000), 64, (64, 43)),
]


@pytest.mark.parametrize(("size", "max_side", "expected"), FIT)
def test_fit_within(size: tuple[int, int], max_side: int, expected: tuple[int, int]) -> None:
    assert decode.fit_within(size, max_side) == expected


RAW_SIGNATURES = [
    ("cr2", b"II*\x00\x10\x00\x00\x00CR\x02\x00", "Canon CR2"),
    ("cr3", b"\x00\x00\x00\x18ftypcrx \x00\x00\x00\x01", "Canon CR3"),
    ("crw", b"II\x1a\x00\x00\x00HEAPCCDR", "Canon CRW"),
    ("orf", b"IIRO\x08\x00\x00\x00", "Olympus ORF"),
    ("orf-s", b"IIRS\x08\x00\x00\x00", "Olympus ORF"),
    ("orf-be", b"MMOR\x00\x00\x00\x08", "Olympus ORF"),
    ("rw2", b"IIU\x00\x18\x00\x00\x00", "Panasonic RW2"),
    ("raf", b"FUJIFILMCCD-RAW 0201", "Fujifilm RAF"),
    ("x3f", b"FOVb\x00\x00", "Sigma X3F"),
    ("mrw", b"\x00MRM\x00\x00", "Minolta MRW"),
    ("tiff", b"II*\x00\x08\x00\x00\x00", None),
    ("jpeg", b"\xff\xd8\xff\xe1", None),
    ("heic", b"\x00\x00\x00\x18ftypheic", None),
    ("empty", b"", None),
]


@pytest.mark.parametrize(
    ("head", "expected"), [c[1:] for c in RAW_SIGNATURES], ids=[c[0] for c in RAW_SIGNATURES]
)
def test_camera_raw_signature(head: bytes, expected: str | None) -> None:
    assert decode.camera_raw_signature(head) == expected


TIFF_TAGS = [
    ("plain", {256: 100, 262: 2, 259: 1}, None),
    ("full-res-first-page", {254: 0}, None),
    ("page-of-multipage", {254: 2}, None),  # bit 1: a page, not a preview
    ("preview-first", {254: 1}, "reduced-resolution preview"),
    ("dng", {50706: b"\x01\x04\x00\x00"}, "DNG"),
    ("cfa", {262: 32803}, "colour filter array"),
    ("linear-raw", {262: 34892}, "linear raw"),
    ("nef-compression", {259: 34713}, "Nikon NEF"),
    ("arw-compression", {259: 32767}, "Sony ARW"),
    ("lzw", {259: 5}, None),
]


@pytest.mark.parametrize(("tags", "expected"), [c[1:] for c in TIFF_TAGS], ids=[c[0] for c in TIFF_TAGS])
def test_tiff_raw_kind(tags: dict[int, object], expected: str | None) -> None:
    kind = decode.tiff_raw_kind(tags)
    assert (kind is None) if expected is None else (kind is not None and expected in kind)


LOW_BYTE = [
    ("RGB;16B", "RGB;16L"),
    ("RGB;16L", "RGB;16B"),
    ("RGBA;16B", "RGBA;16L"),
    ("RGB;16N", "RGB;16B" if sys.byteorder == "little" else "RGB;16L"),
]


@pytest.mark.parametrize(("rawmode", "expected"), LOW_BYTE)
def test_low_byte_rawmode(rawmode: str, expected: str) -> None:
    assert decode._low_byte_rawmode(rawmode) == expected


RANGES = [
    # (data, low, high, expected)
    ([3000, 6000, 9000], 3000, 9000, [0, 128, 255]),
    ([0, 65535], 0, 65535, [0, 255]),
    ([5, 5], 5, 5, [0, 0]),  # flat: no division by zero
    ([-1.0, 0.0, 0.5, 1.0, 2.0], 0.0, 1.0, [0, 0, 128, 255, 255]),  # clipped outside
    ([float("nan"), 1.0], 0.0, 1.0, [0, 255]),
]


@pytest.mark.parametrize(("data", "low", "high", "expected"), RANGES)
def test_range_to_8bit(data: list[float], low: float, high: float, expected: list[int]) -> None:
    assert decode.range_to_8bit(np.array(data), low, high).tolist() == expected


def test_data_range_ignores_non_finite_values() -> None:
    assert decode.data_range(np.array([np.nan, -np.inf, 2.0, 7.5, np.inf])) == (2.0, 7.5)
    assert decode.data_range(np.array([3000, 12, 9000], np.uint16)) == (12.0, 9000.0)


def test_register_openers_is_idempotent() -> None:
    decode.register_openers()
    decode.register_openers()
    assert "HEIF" in Image.OPEN


# --- orientation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_ends_upright(tmp_path: Path, orientation: int) -> None:
    src = photos.oriented_jpeg(tmp_path / "phone.jpg", orientation, gps=True)

    full = load_full(src)
    assert isinstance(full, FullImage)
    assert full.image.mode == "RGB" and full.image.size == photos.UPRIGHT_SIZE
    assert photos.marker_corner(full.image) == "top-left"
    exif = Image.Exif()
    assert full.exif is not None
    exif.load(full.exif)
    assert exif[274] == 1  # outputs carry Orientation=1
    assert exif[271] == "Dropcut Phone Co."
    assert exif.get_ifd(0x8769)[0x8827] == 200  # the Exif IFD (ISO) kept
    assert 0x8825 not in exif  # the GPS position stripped

    proxy = make_proxy(src, tmp_path / "proxy.jpg", max_side=200)
    assert proxy == Proxy(size=(200, 133), format="JPEG", bytes=(tmp_path / "proxy.jpg").stat().st_size)
    with Image.open(tmp_path / "proxy.jpg") as img:
        assert img.size == (200, 133) and img.mode == "RGB"
        assert photos.marker_corner(img) == "top-left"
        assert not img.getexif()  # no metadata leaves the machine (no GPS)


def test_gps_is_kept_when_asked(tmp_path: Path) -> None:
    src = photos.oriented_jpeg(tmp_path / "phone.jpg", 6, gps=True)
    full = load_full(src, strip_gps=False)
    assert full.exif is not None
    exif = Image.Exif()
    exif.load(full.exif)
    assert exif.get_ifd(0x8825)[1] == "N" and exif[274] == 1


def test_no_exif_is_none(tmp_path: Path) -> None:
    src = tmp_path / "plain.png"
    photos.scene().save(src)
    assert load_full(src).exif is None


# --- HEIC --------------------------------------------------------------------------------------------


def test_heic_from_a_phone(inbox: Path, spool: Path, tmp_path: Path) -> None:
    src = photos.heic(inbox / "IMG_0001.HEIC", orientation=6)
    result = inspect(inbox, spool, "IMG_0001.HEIC")
    assert isinstance(result, Inspected), result
    assert (result.format, result.frames) == ("HEIF", 1)

    proxy = make_proxy(src, tmp_path / "proxy.jpg")
    assert proxy.format == "JPEG" and proxy.size == photos.UPRIGHT_SIZE  # small: not upscaled
    with Image.open(tmp_path / "proxy.jpg") as img:
        assert photos.marker_corner(img) == "top-left"
    full = load_full(src)
    assert full.image.size == photos.UPRIGHT_SIZE
    assert photos.marker_corner(full.image) == "top-left"


def test_heic_is_accepted_in_an_inspection_worker_process(inbox: Path, spool: Path) -> None:
    photos.heic(inbox / "IMG_0002.HEIC")
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver")) as pool:
        call = functools.partial(inspect_some, capture=True)
        results, _ = pool.submit(call, ["IMG_0002.HEIC"], inbox, spool, MAX_FILE).result(timeout=60)
    assert [getattr(r, "format", r) for r in results] == ["HEIF"]


# --- colour -------------------------------------------------------------------------------------------


def test_cmyk_jpeg_with_a_profile_is_converted_through_it(tmp_path: Path) -> None:
    src = tmp_path / "print.jpg"
    photos.cmyk_patches().save(src, "JPEG", quality=95, icc_profile=photos.cmyk_icc())
    make_proxy(src, tmp_path / "proxy.jpg")
    with Image.open(tmp_path / "proxy.jpg") as img:
        paper, cyan, magenta, yellow = (pixel(img, (i * 64 + 32, 32)) for i in range(4))
    assert min(paper) >= 235  # paper white shows as white (relative colorimetric)
    for got, corner in ((cyan, (1, 0, 0, 0)), (magenta, (0, 1, 0, 0)), (yellow, (0, 0, 1, 0))):
        assert close_to(got, photos.lab_to_srgb(photos.CMYK_CORNERS[corner]), 8), (got, corner)
    assert cyan[1] < 200  # the naive formula would give (0, 255, 255)

    full = load_full(src)
    assert full.image.mode == "RGB" and full.icc_profile == decode.srgb_icc()
    assert close_to(pixel(full.image, (160, 32)), photos.lab_to_srgb(photos.CMYK_CORNERS[(0, 1, 0, 0)]), 8)


def test_cmyk_jpeg_without_a_profile_gets_the_default_conversion(tmp_path: Path) -> None:
    src = tmp_path / "print.jpg"
    photos.cmyk_patches().save(src, "JPEG", quality=95)
    make_proxy(src, tmp_path / "proxy.jpg")
    with Image.open(tmp_path / "proxy.jpg") as img:
        got = [pixel(img, (i * 64 + 32, 32)) for i in range(4)]
    expected = [(255, 255, 255), (0, 255, 255), (255, 0, 255), (255, 255, 0)]  # (255-C)(255-K)/255
    assert all(close_to(g, e, 6) for g, e in zip(got, expected, strict=True)), got
    assert load_full(src).icc_profile == decode.srgb_icc()


def test_display_p3_keeps_its_profile_at_full_size_and_the_proxy_is_srgb(tmp_path: Path) -> None:
    p3 = photos.display_p3_icc()
    original = photos.scene()
    original.paste((200, 120, 60), (200, 20, 260, 60))  # an orange patch
    src = tmp_path / "p3.png"
    original.save(src, icc_profile=p3)

    full = load_full(src)
    assert full.icc_profile == p3  # attached to the output: colours do not shift
    assert full.image.tobytes() == original.tobytes()  # pixels untouched

    make_proxy(src, tmp_path / "proxy.jpg")
    with Image.open(tmp_path / "proxy.jpg") as img:
        assert img.info["icc_profile"] == decode.srgb_icc()
        got = pixel(img, (230, 40))
    assert close_to(got, photos.p3_to_srgb((200, 120, 60)), 4), got  # (213, 115, 42)
    assert not close_to(got, (200, 120, 60), 8)


# --- 16 bits ---------------------------------------------------------------------------------------


def _gray16_tiff(path: Path, data: np.ndarray) -> None:
    Image.fromarray(data.astype(np.uint16)).save(path, "TIFF")


SIXTEEN = [  # (id, extension, grey?, writer)
    ("png-grey", "png", True, photos.png16),
    ("tiff-grey", "tif", True, _gray16_tiff),
    ("png-rgb", "png", False, photos.png16),
    ("tiff-rgb-le", "tif", False, photos.tiff16_rgb),
    ("tiff-rgb-be", "tif", False, functools.partial(photos.tiff16_rgb, big_endian=True)),
]


@pytest.mark.parametrize(("ext", "grey", "write"), [c[1:] for c in SIXTEEN], ids=[c[0] for c in SIXTEEN])
def test_16bit_is_mapped_by_its_range_not_clipped(
    tmp_path: Path, ext: str, grey: bool, write: object
) -> None:
    data = photos.scene16(low=3000, high=9000)  # 16-bit values, ~10% of the range
    source = data[..., 1] if grey else data
    assert callable(write)
    src = tmp_path / f"scan.{ext}"
    write(src, source)

    full = load_full(src)
    assert full.image.mode == "RGB" and full.image.size == (240, 160)
    out = np.asarray(full.image).astype(np.int32)
    out = out[..., 1] if grey else out
    assert out.min() <= 2 and out.max() >= 253  # spans 0..255: by range, not the high/low byte
    order = np.argsort(source.reshape(-1), kind="stable")
    assert np.all(np.diff(out.reshape(-1)[order]) >= 0)  # ordering kept: one increasing map

    proxy = make_proxy(src, tmp_path / "proxy.jpg")
    assert proxy.format == "JPEG"
    with Image.open(tmp_path / "proxy.jpg") as img:
        lo, hi = np.percentile(np.asarray(img), [1, 99])
    assert lo < 40 and hi > 200


def test_float_tiff_is_mapped_by_its_range(tmp_path: Path) -> None:
    data = photos.scene_array()[..., 1].astype(np.float32) / 1000 - 0.05  # -0.05 .. 0.2
    src = tmp_path / "depth.tif"
    Image.fromarray(data, "F").save(src)
    out = np.asarray(load_full(src).image)
    assert out.min() == 0 and out.max() == 255


# --- frames ------------------------------------------------------------------------------------------


def test_mpo_uses_its_primary_image(inbox: Path, spool: Path) -> None:
    src = photos.mpo(inbox / "stereo.mpo")
    result = inspect(inbox, spool, "stereo.mpo", multi_frame="quarantine")
    assert isinstance(result, Inspected) and (result.format, result.frames) == ("JPEG", 1)
    full = load_full(src)
    assert photos.marker_corner(full.image) == "top-left"  # the second view is mirrored
    assert abs(np.asarray(full.image).mean() - photos.scene_array().mean()) < 3  # not the darker one


MULTI = [("pages.tif", photos.multipage_tiff, 3, "TIFF"), ("anim.gif", photos.animated_gif, 4, "GIF")]


@pytest.mark.parametrize(("name", "build", "frames", "fmt"), MULTI, ids=["tiff", "gif"])
def test_multi_frame_first_counts_and_quarantine_refuses(
    inbox: Path, spool: Path, tmp_path: Path, name: str, build: object, frames: int, fmt: str
) -> None:
    assert callable(build)
    src = build(inbox / name)
    first = inspect(inbox, spool, name, multi_frame="first")
    assert isinstance(first, Inspected) and (first.format, first.frames) == (fmt, frames)
    refused = inspect(inbox, spool, name, multi_frame="quarantine")
    assert isinstance(refused, Refused)
    assert (refused.status, refused.code) == (422, "multi_frame")
    assert f"{frames} frames" in refused.detail
    assert make_proxy(src, tmp_path / "proxy.jpg").format == "JPEG"  # the first frame


# --- camera raw ---------------------------------------------------------------------------------------

RAW_FILES = [
    ("nef-like-preview", lambda p: photos.raw_like_tiff(p, preview=True)),
    ("dng", lambda p: photos.raw_like_tiff(p, dng=True)),
    ("cr2", lambda p: p.write_bytes(b"II*\x00\x10\x00\x00\x00CR\x02\x00" + bytes(200))),
    ("orf", lambda p: p.write_bytes(b"IIRO\x08\x00\x00\x00" + bytes(200))),
    ("rw2", lambda p: p.write_bytes(b"IIU\x00\x18\x00\x00\x00" + bytes(200))),
    ("cr3", lambda p: p.write_bytes(b"\x00\x00\x00\x18ftypcrx \x00\x00\x00\x01crx isom" + bytes(200))),
]


@pytest.mark.parametrize("build", [c[1] for c in RAW_FILES], ids=[c[0] for c in RAW_FILES])
def test_camera_raw_is_refused_locally(inbox: Path, spool: Path, tmp_path: Path, build: object) -> None:
    assert callable(build)
    build(inbox / "raw.file")
    result = inspect(inbox, spool, "raw.file")
    assert isinstance(result, Refused)
    assert (result.status, result.code) == (415, "camera_raw")
    assert "export it as a JPEG or TIFF" in result.detail
    assert list(spool.iterdir()) == []
    with pytest.raises(DecodeError) as err:
        make_proxy(inbox / "raw.file", tmp_path / "proxy.jpg")
    assert (err.value.status, err.value.code) == (415, "camera_raw")
    assert not (tmp_path / "proxy.jpg").exists()


def test_a_normal_tiff_is_not_raw(inbox: Path, spool: Path) -> None:
    photos.scene().save(inbox / "scan.tif", "TIFF", tiffinfo={271: "NIKON CORPORATION", 254: 0})
    assert isinstance(inspect(inbox, spool, "scan.tif"), Inspected)


# --- size limits, the proxy's size and memory ----------------------------------------------------------


def test_big_jpeg_matte_mode_accepts_cutout_mode_refuses(big_jpeg: Path, tmp_path: Path) -> None:
    inbox, spool = big_jpeg.parent, tmp_path
    size = big_jpeg.stat().st_size
    assert size > API_LIMIT
    matte = inspect(inbox, spool, big_jpeg.name, max_upload_bytes=None)
    assert isinstance(matte, Inspected) and (matte.width, matte.height) == (6000, 4000)
    cutout = inspect(inbox, spool, big_jpeg.name, max_upload_bytes=API_LIMIT)
    assert isinstance(cutout, Refused) and (cutout.status, cutout.code) == (413, "too_large")
    assert "10 MB" in cutout.detail and str(API_LIMIT) in cutout.detail

    proxy = make_proxy(big_jpeg, tmp_path / "proxy.jpg")
    assert proxy == Proxy(size=(1024, 683), format="JPEG", bytes=(tmp_path / "proxy.jpg").stat().st_size)
    assert proxy.bytes < 2 * MiB
    with Image.open(tmp_path / "proxy.jpg") as img:
        assert img.size == (1024, 683)


_PEAK = """
import json, resource, sys
from pathlib import Path
from dropcut.decode import make_proxy
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
make_proxy(Path(sys.argv[1]), Path(sys.argv[2]))
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before))
"""


def test_a_big_jpeg_proxy_never_costs_a_full_size_decode(big_jpeg: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PEAK, str(big_jpeg), str(tmp_path / "p.jpg")],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    grew = json.loads(out.stdout) * 1024
    assert grew < 48 * MiB  # a full decode alone holds 6000 x 4000 x 4 = 96 MB


def test_transparency_makes_a_png_proxy_and_an_rgba_full_image(tmp_path: Path) -> None:
    cutout = photos.scene().convert("RGBA")
    alpha = Image.new("L", cutout.size, 0)
    alpha.paste(255, (0, 0, 300, 240))
    cutout.putalpha(alpha)
    src = tmp_path / "cutout.png"
    cutout.save(src)
    proxy = make_proxy(src, tmp_path / "proxy.png", max_side=180)
    assert (proxy.format, proxy.size) == ("PNG", (180, 120))
    with Image.open(tmp_path / "proxy.png") as img:
        assert img.mode == "RGBA" and pixel(img, (179, 60))[3] == 0 and pixel(img, (10, 60))[3] == 255
    assert load_full(src).image.mode == "RGBA"

    opaque = tmp_path / "opaque.png"
    photos.scene().convert("RGBA").save(opaque)  # an alpha channel that is opaque everywhere
    assert make_proxy(opaque, tmp_path / "proxy2.jpg").format == "JPEG"
    assert load_full(opaque).image.mode == "RGB"


def test_undecodable_input_raises_and_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "broken.jpg"
    src.write_bytes(photos.encode(photos.scene(), "JPEG")[:2000])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DecodeError) as err:
        make_proxy(src, out / "proxy.jpg")
    assert isinstance(err.value, ValueError)
    assert (err.value.status, err.value.code) == (422, "corrupt_image")
    assert list(out.iterdir()) == []
    with pytest.raises(DecodeError):
        load_full(tmp_path / "broken.jpg")
    (tmp_path / "text.jpg").write_bytes(b"not an image at all")
    with pytest.raises(DecodeError) as err:
        load_full(tmp_path / "text.jpg")
    assert err.value.code == "corrupt_image"


def test_the_proxy_replaces_dest_atomically(tmp_path: Path) -> None:
    src = photos.oriented_jpeg(tmp_path / "a.jpg", 1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "proxy.jpg").write_bytes(b"old")
    make_proxy(src, out / "proxy.jpg")
    assert [p.name for p in out.iterdir()] == ["proxy.jpg"]  # no temp file left
    with Image.open(io.BytesIO((out / "proxy.jpg").read_bytes())) as img:
        assert img.format == "JPEG"


def test_max_pixels_refuses_before_decoding(tmp_path: Path) -> None:
    src = photos.oriented_jpeg(tmp_path / "a.jpg", 1)
    with pytest.raises(DecodeError) as err:
        make_proxy(src, tmp_path / "p.jpg", max_pixels=1000)
    assert err.value.code == "too_many_pixels"


def test_a_slow_decode_is_stopped_by_the_timeout(tmp_path: Path) -> None:
    from tests.hostile_images import many_scan_jpeg

    src = tmp_path / "slow.jpg"
    src.write_bytes(many_scan_jpeg(4000, 4000, 479))  # ~1 s of decoding
    with pytest.raises(DecodeError) as err:
        load_full(src, timeout=0.05)
    assert err.value.code == "decode_too_slow" and "0.05 s" in err.value.detail
