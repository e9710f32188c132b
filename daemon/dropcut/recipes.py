"""Output recipes: what each input becomes (issue 11). Pure: no I/O, no clock.

An *output spec* (:class:`OutputSpec`) says how one output file is made from the photo and
its matte: format, background, crop, margin, canvas, fit, quality, and where it goes
(``suffix`` on the stem, ``folder`` below the outbox). A spec may name a *preset*
(:data:`PRESETS`); fields given beside ``preset`` override the preset's.
:meth:`OutputSpec.resolve` turns a spec into a *resolved* one: ``preset`` is ``None`` and
every field holds its concrete value, so two ways of writing the same output compare
equal and hash alike (:func:`recipe_key`).

A *recipe* is the tuple of specs that applies to one input: ``outputs`` for the whole
inbox, or the ``outputs`` of the longest ``[folders."<inbox subfolder>"]`` table that
contains the input (:func:`recipe_for`).

Defaults (a field not given, neither by the spec nor by its preset):

========================  ===============================================================
``format``                ``png``
``background``            the format's own: ``transparent`` for png, webp and mask,
                          ``#ffffff`` for jpeg. jpeg with ``transparent`` is an error;
                          mask with a colour is an error (a mask is 8-bit grayscale: its
                          padding, if any, is 0)
``crop``                  ``none``
``crop_threshold``        10 (of 255): alpha *above* it counts as subject (0-254)
``margin``                ``0px``
``canvas``                ``original``: no scaling; the canvas is the cropped region plus
                          the margin (the whole image when ``crop = "none"``)
``fit``                   ``contain`` (``cover`` needs a canvas ``WxH``)
``quality``               92 for jpeg and webp; giving one for png or mask is an error
``suffix``                ``""``
``folder``                ``""`` (the outbox itself)
========================  ===============================================================

Geometry (:func:`layout`): a margin ``"5%"`` is 5 % of the *larger side* of the subject's
box (of the whole image when ``crop = "none"``), the same number of pixels on all four
sides; it scales with the subject. A margin ``"40px"`` is 40 pixels of the *output*
(of the canvas). ``contain`` scales the subject (up or down) so that it plus its margin
fits the canvas, centred; ``cover`` so that it plus its margin covers the canvas, centred,
the overflow cut off. With ``crop = "subject"`` nothing of the photo outside the subject's
box plus its margin is drawn (the rest of the canvas is the background); an input whose
alpha holds no subject pixel falls back to the whole image.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple, TypeAlias

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from dropcut.paths import NAME_MAX, STAGING_DIR, output_candidates, output_key

if TYPE_CHECKING:  # numpy only where the geometry is computed (a render worker); the
    import numpy as np  # daemon, which validates recipes, never needs it
    import numpy.typing as npt

Format: TypeAlias = Literal["png", "jpeg", "webp", "mask"]
PresetName: TypeAlias = Literal["transparent", "mask", "white-jpeg", "amazon", "shopify", "webp"]
Box: TypeAlias = tuple[int, int, int, int]
"""``(x0, y0, x1, y1)`` in pixels, ``x1``/``y1`` exclusive (Pillow's box convention)."""

DEFAULT_QUALITY = 92
MAX_CANVAS_PIXELS = 100_000_000
MAX_MARGIN_PX = 10_000
MAX_SUFFIX_LEN = 64
EXTENSIONS: Mapping[str, str] = {"png": "png", "jpeg": "jpg", "webp": "webp", "mask": "png"}

_SUFFIX_RE = re.compile(r"[A-Za-z0-9._+-]*")
_COLOUR_RE = re.compile(r"#[0-9a-fA-F]{6}")
_PERCENT_RE = re.compile(r"(\d+(?:\.\d+)?)\s*%")
_PX_RE = re.compile(r"(\d+)\s*px")
_CANVAS_RE = re.compile(r"(\d+)\s*[xX×]\s*(\d+)")


def _error(message: str) -> PydanticCustomError:
    # a custom error keeps pydantic from prefixing "Value error, " to the message
    return PydanticCustomError("dropcut_recipe", message)


# --- small typed values -------------------------------------------------------------


@dataclass(frozen=True)
class Margin:
    """A margin: ``value`` percent of the subject's larger side (``unit = "%"``) or
    ``value`` pixels of the output (``unit = "px"``). ``str()`` gives ``"5%"`` / ``"40px"``."""

    value: float
    unit: Literal["%", "px"]

    def __str__(self) -> str:
        if self.unit == "px":
            return f"{int(self.value)}px"
        return f"{self.value:g}%"


class Size(NamedTuple):
    """A canvas size in pixels."""

    width: int
    height: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def parse_margin(value: object) -> Margin:
    """``"5%"`` (0-100, decimals allowed), ``"40px"`` (0-10000) or ``0`` as a :class:`Margin`.

    Raises:
        PydanticCustomError: anything else (a bare number other than 0 is ambiguous).
    """
    if isinstance(value, Margin):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value == 0:
        return Margin(0, "px")
    if isinstance(value, str):
        text = value.strip()
        if text == "0":
            return Margin(0, "px")
        if m := _PERCENT_RE.fullmatch(text):
            percent = float(m.group(1))
            if percent > 100:
                raise _error(f"{text!r} is more than 100%")
            return Margin(percent, "%")
        if m := _PX_RE.fullmatch(text):
            px = int(m.group(1))
            if px > MAX_MARGIN_PX:
                raise _error(f"{text!r} is more than {MAX_MARGIN_PX}px")
            return Margin(px, "px")
    raise _error(f'must be like "5%" (of the subject\'s larger side) or "40px", not {value!r}')


def parse_canvas(value: object) -> Size | None:
    """``"original"`` (``None``) or ``"WxH"`` in pixels (each side ≥ 1, at most 100 MP).

    Raises:
        PydanticCustomError: anything else.
    """
    if value is None or isinstance(value, Size):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text == "original":
            return None
        if m := _CANVAS_RE.fullmatch(text):
            size = Size(int(m.group(1)), int(m.group(2)))
            if size.width < 1 or size.height < 1:
                raise _error(f"{text!r} has a side of 0 pixels")
            if size.width * size.height > MAX_CANVAS_PIXELS:
                raise _error(f"{text!r} is more than {MAX_CANVAS_PIXELS // 1_000_000} megapixels")
            return size
    raise _error(f'must be "original" or "WxH" in pixels such as "2000x2000", not {value!r}')


def _canvas_text(value: Size | None) -> str:
    return "original" if value is None else str(value)


def _format_alias(value: object) -> object:
    if isinstance(value, str):
        value = value.strip().lower()
        return "jpeg" if value == "jpg" else value
    return value


def check_folder(value: str, what: str = "folder") -> str:
    """``value`` if it is a relative POSIX folder path: components separated by ``/``, none
    empty, ``.`` or ``..``, no ``\\``, no control characters, each ≤ 255 bytes of UTF-8,
    not dropcut's own ``.dropcut-*`` names. ``""`` is returned as is (the top folder).

    Raises:
        PydanticCustomError: naming the problem; ``what`` says what kind of folder it is.
    """
    if value == "":
        return value
    if value.startswith("/"):
        raise _error(f"{value!r} is absolute: give a {what} relative to its top folder")
    if "\\" in value:
        raise _error(f"{value!r} holds a backslash: separate folders with /")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise _error(f"{value!r} holds a control character")
    for part in value.split("/"):
        if part in ("", ".", ".."):
            raise _error(f"{value!r} has an empty, '.' or '..' component")
        if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise _error(f"{value!r} has a component longer than {NAME_MAX} bytes")
        if part == STAGING_DIR or part.startswith(".dropcut-"):
            raise _error(f"{value!r}: names starting with .dropcut- are dropcut's own")
    return value


# --- the spec -----------------------------------------------------------------------

_FIELDS = (
    "format",
    "background",
    "crop",
    "crop_threshold",
    "margin",
    "canvas",
    "fit",
    "quality",
    "suffix",
    "folder",
)


class OutputSpec(BaseModel):
    """One output of a recipe (see the module docstring for defaults and geometry).

    Every field is checked on construction; a combination that cannot be rendered (jpeg
    on ``transparent``, a mask with a colour, ``quality`` for png, ``cover`` without a
    canvas, a pixel margin that leaves no room in the canvas) is refused too, after the
    preset's fields are applied. Errors are :class:`pydantic.ValidationError` whose
    one-line messages name the field (by location, or at the start of the message for
    combinations).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: PresetName | None = None
    format: Annotated[Format, BeforeValidator(_format_alias)] = "png"
    background: str | None = None
    crop: Literal["none", "subject"] = "none"
    crop_threshold: Annotated[int, Field(ge=0, le=254)] = 10
    margin: Annotated[Margin, PlainValidator(parse_margin), PlainSerializer(str, return_type=str)] = Margin(
        0, "px"
    )
    canvas: Annotated[
        Size | None, PlainValidator(parse_canvas), PlainSerializer(_canvas_text, return_type=str)
    ] = None
    fit: Literal["contain", "cover"] = "contain"
    quality: Annotated[int, Field(ge=1, le=100)] | None = None
    suffix: str = ""
    folder: str = ""

    @field_validator("background")
    @classmethod
    def _background(cls, value: str | None) -> str | None:
        if value is None:
            return None
        text = value.strip()
        if text.lower() == "transparent":
            return "transparent"
        if _COLOUR_RE.fullmatch(text):
            return text.lower()
        raise _error(f'must be "transparent" or a colour "#rrggbb", not {value!r}')

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str) -> str:
        if len(value) > MAX_SUFFIX_LEN or not _SUFFIX_RE.fullmatch(value):
            raise _error(f"{value!r}: at most {MAX_SUFFIX_LEN} of the characters A-Z a-z 0-9 . _ + -")
        return value

    @field_validator("folder")
    @classmethod
    def _folder(cls, value: str) -> str:
        return check_folder(value, "folder of the outbox")

    @model_validator(mode="after")
    def _combination(self) -> OutputSpec:
        self._resolved_values()
        return self

    # --- resolution ---

    def _resolved_values(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        given: set[str] = set()
        sources = [self] if self.preset is None else [PRESETS[self.preset], self]
        for source in sources:
            for name in source.model_fields_set - {"preset"}:
                values[name] = getattr(source, name)
                given.add(name)
        for name in _FIELDS:
            values.setdefault(name, type(self).model_fields[name].default)
        where = f' (from preset "{self.preset}")' if self.preset else ""
        fmt = values["format"]
        if fmt == "jpeg":
            if values["background"] == "transparent":
                raise _error('background: jpeg has no transparency: give a colour such as "#ffffff"' + where)
            values["background"] = values["background"] or "#ffffff"
        elif fmt == "mask":
            if values["background"] not in (None, "transparent"):
                raise _error(
                    f"background: a mask (8-bit grayscale) has no background colour, "
                    f"not {values['background']!r}{where}"
                )
            values["background"] = "transparent"
        else:
            values["background"] = values["background"] or "transparent"
        if fmt in ("jpeg", "webp"):
            values["quality"] = values["quality"] or DEFAULT_QUALITY
        elif values["quality"] is not None:
            raise _error(f'quality: only jpeg and webp have a quality, not format "{fmt}"{where}')
        canvas: Size | None = values["canvas"]
        if values["fit"] == "cover" and canvas is None:
            raise _error(f'fit: "cover" needs a canvas "WxH", not "original"{where}')
        margin: Margin = values["margin"]
        if canvas is not None and margin.unit == "px" and 2 * margin.value >= min(canvas):
            raise _error(f"margin: 2 × {margin} leaves no room in canvas {canvas}{where}")
        return values

    def resolve(self) -> OutputSpec:
        """This spec with its preset applied and every default filled in (``preset`` is
        ``None``; ``background`` and, for jpeg/webp, ``quality`` are concrete). Resolving a
        resolved spec gives an equal one. (Worked out once per spec: a spec is frozen.)"""
        return self._resolved

    @functools.cached_property
    def _resolved(self) -> OutputSpec:
        return OutputSpec.model_construct(preset=None, **self._resolved_values())

    @property
    def extension(self) -> str:
        """File extension of the output, without the dot: png, jpg, webp (mask: png)."""
        return EXTENSIONS[self.resolve().format]

    @functools.cached_property
    def tail(self) -> str:
        """What follows the stem in the output's name: ``suffix`` + ``.`` + extension."""
        resolved = self.resolve()
        return f"{resolved.suffix}.{EXTENSIONS[resolved.format]}"

    def describe(self) -> str:
        """A short human description for error messages: ``preset "mask"`` or
        ``format "png", suffix "-x"``."""
        if self.preset is not None:
            return f'preset "{self.preset}"'
        dumped = self.model_dump(mode="json")
        given = [f'{name} "{dumped[name]}"' for name in _FIELDS if name in self.model_fields_set]
        return ", ".join(given) or "the default"


def _preset(**fields: Any) -> OutputSpec:
    return OutputSpec(**fields)


PRESETS: dict[PresetName, OutputSpec] = {}
"""Preset name → the spec it stands for (fields it sets explicitly; the rest default)."""
PRESETS.update(
    {
        # today's output: straight-alpha RGBA PNG at the photo's size
        "transparent": _preset(format="png", background="transparent"),
        # the matte at full resolution as an 8-bit grayscale PNG
        "mask": _preset(format="mask", suffix="-mask"),
        # the subject on white, cropped to it with 5 % of its larger side around it
        "white-jpeg": _preset(format="jpeg", background="#ffffff", crop="subject", margin="5%"),
        # 150 px of 2000 on each side: the subject's larger side is 1700 px = 85 % of the canvas
        "amazon": _preset(
            format="jpeg",
            background="#ffffff",
            crop="subject",
            margin="150px",
            canvas="2000x2000",
            fit="contain",
            suffix="-amazon",
        ),
        # a centred square: the subject with 5 % margin fitted into 2048 x 2048 on white
        "shopify": _preset(
            format="jpeg",
            background="#ffffff",
            crop="subject",
            margin="5%",
            canvas="2048x2048",
            fit="contain",
            suffix="-shopify",
        ),
        # like "transparent", as WebP with alpha
        "webp": _preset(format="webp", background="transparent"),
    }
)

DEFAULT_OUTPUTS: tuple[OutputSpec, ...] = (OutputSpec(preset="transparent"),)
"""The recipe of a user who sets nothing: one transparent PNG, as before issue 11."""


# --- recipes ------------------------------------------------------------------------


def check_recipe(specs: Sequence[OutputSpec]) -> tuple[OutputSpec, ...]:
    """``specs`` resolved, if it is a usable recipe: at least one spec, and no two that would
    write the same output name ignoring case (the same ``folder``/``suffix``/extension).

    Raises:
        PydanticCustomError: one line naming both specs (1-based) and the name they share.
    """
    if not specs:
        raise _error("a recipe needs at least one output")
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        # the stem is shared by all outputs of one input, so the folder and tail decide
        name = _join(spec.resolve().folder, f"<stem>{spec.tail}")
        key = output_key(name)
        if key in seen:
            j = seen[key]
            raise _error(
                f"outputs {j + 1} ({specs[j].describe()}) and {i + 1} ({spec.describe()}) would "
                f'both write "{name}": give one a suffix or a folder'
            )
        seen[key] = i
    return tuple(spec.resolve() for spec in specs)


def check_inbox_folder(value: str) -> str:
    """A ``[folders."<key>"]`` key: a folder of the inbox, relative (see :func:`check_folder`).

    Raises:
        PydanticCustomError: naming the problem (also for ``""``: the inbox itself has
            ``outputs``).
    """
    if value == "":
        raise _error("an empty folder name: the inbox itself takes the top-level outputs")
    return check_folder(value, "folder of the inbox")


Recipe = Annotated[tuple[OutputSpec, ...], AfterValidator(check_recipe)]
"""A validated, resolved recipe: use as the type of ``outputs`` in the settings."""


class FolderRecipe(BaseModel):
    """The table ``[folders."<inbox subfolder>"]``: that folder's own ``outputs``, which its
    subfolders inherit. Unknown keys are refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    outputs: Recipe


def _check_folders(value: dict[str, FolderRecipe]) -> dict[str, FolderRecipe]:
    for key in value:
        try:
            check_inbox_folder(key)
        except PydanticCustomError as exc:
            raise _error(f'[folders."{key}"]: {exc.message()}') from None
    return value


Folders = Annotated[dict[str, FolderRecipe], AfterValidator(_check_folders)]
"""Validated ``[folders."x"]`` tables: use as the type of ``folders`` in the settings."""


def folder_recipes(folders: Mapping[str, FolderRecipe]) -> dict[str, tuple[OutputSpec, ...]]:
    """``folders`` as :func:`recipe_for` takes them: folder → its resolved recipe."""
    return {key: table.outputs for key, table in folders.items()}


def recipe_for(
    rel_path: str,
    default: tuple[OutputSpec, ...],
    folders: Mapping[str, tuple[OutputSpec, ...]],
) -> tuple[OutputSpec, ...]:
    """The recipe for the input ``rel_path`` (POSIX, relative to the inbox).

    The key of ``folders`` whose path components are the longest prefix of the input's
    folder wins: ``shop`` applies to ``shop/a.jpg`` and ``shop/x/a.jpg``, not to
    ``shopping/a.jpg`` nor to ``a.jpg``; ``shop/x`` beats ``shop`` for ``shop/x/a.jpg``.
    Matching is exact and case-sensitive (``Shop`` is not ``shop``). No key matches:
    ``default``.
    """
    parent = PurePosixPath(rel_path).parent.parts
    best: tuple[OutputSpec, ...] = default
    best_len = -1
    for key, specs in folders.items():
        parts = tuple(key.split("/"))
        if len(parts) > best_len and parent[: len(parts)] == parts:
            best, best_len = specs, len(parts)
    return best


def recipe_key(specs: Sequence[OutputSpec]) -> str:
    """16 hex digits identifying what a recipe produces: a hash of its resolved specs, so
    a preset and the same spec spelled out give the same key. The order of the specs does
    not count (it changes no output)."""
    texts = sorted(
        json.dumps(spec.resolve().model_dump(mode="json", exclude={"preset"}), sort_keys=True)
        for spec in specs
    )
    return hashlib.sha256(("recipe-v1\n" + "\n".join(texts)).encode()).hexdigest()[:16]


def recipe_json(specs: Sequence[OutputSpec]) -> str | None:
    """A recipe as the queue records it with a job: JSON of its resolved specs, or None
    for the default recipe (today's transparent PNG)."""
    resolved = [spec.resolve() for spec in specs]
    if resolved == [spec.resolve() for spec in DEFAULT_OUTPUTS]:
        return None
    return json.dumps([spec.model_dump(mode="json", exclude={"preset"}) for spec in resolved])


def recipe_from_json(text: str | None) -> tuple[OutputSpec, ...]:
    """The recipe :func:`recipe_json` recorded (None: the default). Raises
    :class:`pydantic.ValidationError` for a record no spec can be made of."""
    if text is None:
        return DEFAULT_OUTPUTS
    return tuple(OutputSpec.model_validate(item) for item in json.loads(text))


# --- names --------------------------------------------------------------------------


def _join(folder: str, rel: str) -> str:
    return str(PurePosixPath(folder) / rel) if folder else rel


def name_candidates(rel_path: str, tail: str) -> Iterator[str]:
    """:func:`dropcut.paths.output_candidates` for an output ending in ``tail`` (suffix and
    extension, e.g. ``-amazon.jpg``): ``a.jpg`` → ``a-amazon.jpg``, ``a~jpg-amazon.jpg``,
    ``a~jpg~2-amazon.jpg``… each within 255 bytes."""
    return output_candidates(rel_path, tail)


def output_name_sets(rel_path: str, specs: Sequence[OutputSpec]) -> Iterator[list[str]]:
    """Sets of output names (below the outbox) for the input ``rel_path``, in order of
    preference: set ``k`` gives every spec its ``k``-th candidate of
    :func:`name_candidates`, so that the outputs of one input move to the next candidate
    together when another input owns one of the names (compare with
    :func:`dropcut.paths.output_key`)."""
    streams = [(spec.resolve().folder, name_candidates(rel_path, spec.tail)) for spec in specs]
    while True:
        yield [_join(folder, next(stream)) for folder, stream in streams]


def output_names(rel_path: str, specs: Sequence[OutputSpec]) -> list[str]:
    """Each spec's preferred output path below the outbox, in the order of ``specs``:
    ``<folder>/<rel dir>/<stem><suffix>.<ext>`` (ext ``png``, ``jpg``, ``webp``; a mask is
    ``png``), every name within 255 bytes of UTF-8."""
    return next(output_name_sets(rel_path, specs))


# --- geometry -----------------------------------------------------------------------


def subject_box(alpha: npt.NDArray[np.uint8], threshold: int) -> Box | None:
    """The bounding box of the pixels of ``alpha`` (shape ``(H, W)``, dtype uint8, 255 =
    opaque) whose value is above ``threshold`` (0-254): ``(x0, y0, x1, y1)`` in pixels,
    ``x1``/``y1`` exclusive; ``None`` when there is no such pixel. Needs no temporary of
    the image's size.

    Raises:
        ValueError: ``alpha`` is not 2-D uint8, or ``threshold`` is outside 0-254.
    """
    import numpy as np

    if alpha.ndim != 2 or alpha.dtype != np.uint8:
        raise ValueError(f"alpha must be a 2-D uint8 array, not {alpha.ndim}-D {alpha.dtype}")
    if not 0 <= threshold <= 254:
        raise ValueError(f"threshold must be 0-254, not {threshold}")
    if alpha.size == 0:
        return None
    rows = np.flatnonzero(alpha.max(axis=1) > threshold)
    if rows.size == 0:
        return None
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    cols = np.flatnonzero(alpha[y0:y1].max(axis=0) > threshold)
    return int(cols[0]), y0, int(cols[-1]) + 1, y1


FBox: TypeAlias = tuple[float, float, float, float]
"""``(x0, y0, x1, y1)`` in pixels, fractional: a region of the source."""


@dataclass(frozen=True)
class Layout:
    """How to make one output's canvas from the source image (all in pixels).

    The renderer takes the source's region ``crop`` (``x0, y0, x1, y1``, ``x1``/``y1``
    exclusive, inside the image; fractional when the image is scaled, e.g. Pillow's
    ``image.resize(size, box=crop)``), resizes it to ``size`` (``scale`` output pixels per
    source pixel) and pastes it at ``offset`` onto a canvas of ``canvas`` filled with the
    background (a mask's canvas with 0). When ``scale`` is 1 the crop is whole pixels and
    ``size`` is its size: a plain crop, no resize. :attr:`bounds` is the whole-pixel box
    around ``crop`` (to cut the source down before resizing).

    Guaranteed: ``0 <= offset`` and ``offset + size <= canvas`` on both axes, ``size`` at
    least 1x1, and ``size`` is ``crop``'s size times ``scale`` within one pixel.
    """

    crop: FBox
    scale: float
    size: tuple[int, int]
    canvas: tuple[int, int]
    offset: tuple[int, int]

    @property
    def bounds(self) -> Box:
        """The smallest whole-pixel box of the source holding :attr:`crop`."""
        x0, y0, x1, y1 = self.crop
        return math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)

    def to_canvas(self, x: float, y: float) -> tuple[float, float]:
        """A point of the source (pixels) on the canvas (pixels)."""
        x0, y0, x1, y1 = self.crop
        return (
            self.offset[0] + (x - x0) * self.size[0] / (x1 - x0),
            self.offset[1] + (y - y0) * self.size[1] / (y1 - y0),
        )


def _axis(
    lo: float, hi: float, window_lo: float, scale: float, extent: int, canvas: int
) -> tuple[float, float, int, int]:
    """One axis: the drawable source span ``lo..hi`` (already inside the window) → its
    source span and its whole-pixel span on the canvas (offset, size)."""
    o0 = min(max(0, round((lo - window_lo) * scale)), canvas - 1)
    o1 = max(min(canvas, round((hi - window_lo) * scale)), o0 + 1)
    s0 = min(max(0.0, window_lo + o0 / scale), extent - 1e-6)
    s1 = max(min(float(extent), window_lo + o1 / scale), s0 + 1e-6)
    if scale == 1.0:
        s0, s1 = float(round(s0)), float(round(s1))
        s1 = min(max(s1, s0 + 1), s0 + canvas - o0)
        o1 = o0 + int(s1 - s0)
    return s0, s1, o0, o1 - o0


def layout(image_size: tuple[int, int], box: Box | None, spec: OutputSpec) -> Layout:
    """Where the source goes on the output's canvas for ``spec`` (resolved here).

    ``image_size`` is the source's ``(width, height)`` in pixels; ``box`` the subject's
    box from :func:`subject_box` (used with ``crop = "subject"``; ``None``, no subject,
    means the whole image). See the module docstring for margin, contain and cover.

    Raises:
        ValueError: a size below 1 pixel, or a box that is empty or not inside the image.
    """
    spec = spec.resolve()
    width, height = image_size
    if width < 1 or height < 1:
        raise ValueError(f"image size must be at least 1x1 pixels, not {width}x{height}")
    if spec.crop == "subject" and box is not None:
        bx0, by0, bx1, by1 = box
        if not (0 <= bx0 < bx1 <= width and 0 <= by0 < by1 <= height):
            raise ValueError(f"subject box {box} is empty or not inside {width}x{height}")
    else:
        bx0, by0, bx1, by1 = 0, 0, width, height
    bw, bh = bx1 - bx0, by1 - by0
    margin = spec.margin
    if spec.canvas is None:
        scale = 1.0
        m = round(margin.value / 100 * max(bw, bh)) if margin.unit == "%" else int(margin.value)
        canvas = (bw + 2 * m, bh + 2 * m)
        margin_src = float(m)
    else:
        cw, ch = spec.canvas
        if margin.unit == "%":
            margin_src = margin.value / 100 * max(bw, bh)
            sx, sy = cw / (bw + 2 * margin_src), ch / (bh + 2 * margin_src)
        else:
            sx, sy = (cw - 2 * margin.value) / bw, (ch - 2 * margin.value) / bh
        scale = min(sx, sy) if spec.fit == "contain" else max(sx, sy)
        if margin.unit == "px":
            margin_src = margin.value / scale
        canvas = (cw, ch)
    # the canvas seen in source pixels, centred on the subject
    wx0 = (bx0 + bx1) / 2 - canvas[0] / 2 / scale
    wy0 = (by0 + by1) / 2 - canvas[1] / 2 / scale
    wx1, wy1 = wx0 + canvas[0] / scale, wy0 + canvas[1] / scale
    # what may be drawn: the subject plus its margin, or the whole image; inside the window
    if spec.crop == "subject":
        rx0, ry0, rx1, ry1 = bx0 - margin_src, by0 - margin_src, bx1 + margin_src, by1 + margin_src
    else:
        rx0, ry0, rx1, ry1 = 0.0, 0.0, float(width), float(height)
    x0, x1, ox, pw = _axis(max(wx0, rx0, 0.0), min(wx1, rx1, float(width)), wx0, scale, width, canvas[0])
    y0, y1, oy, ph = _axis(max(wy0, ry0, 0.0), min(wy1, ry1, float(height)), wy0, scale, height, canvas[1])
    return Layout(crop=(x0, y0, x1, y1), scale=scale, size=(pw, ph), canvas=canvas, offset=(ox, oy))


__all__ = [
    "DEFAULT_OUTPUTS",
    "PRESETS",
    "Box",
    "FBox",
    "FolderRecipe",
    "Folders",
    "Layout",
    "Margin",
    "OutputSpec",
    "Recipe",
    "Size",
    "check_folder",
    "check_inbox_folder",
    "check_recipe",
    "folder_recipes",
    "layout",
    "name_candidates",
    "output_name_sets",
    "output_names",
    "recipe_for",
    "recipe_from_json",
    "recipe_json",
    "recipe_key",
    "subject_box",
]
