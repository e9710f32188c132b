"""Output recipes (issue 11, the pure part): specs, presets, per-folder recipes, names,
recipe keys, the subject's box and the layout of each output. Table-driven, no I/O."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from dropcut.paths import NAME_MAX, output_candidates, output_key
from dropcut.recipes import (
    DEFAULT_OUTPUTS,
    PRESETS,
    Folders,
    Layout,
    Margin,
    OutputSpec,
    Recipe,
    Size,
    folder_recipes,
    layout,
    name_candidates,
    output_name_sets,
    output_names,
    recipe_for,
    recipe_key,
    subject_box,
)

RECIPE = TypeAdapter(Recipe)
FOLDERS = TypeAdapter(Folders)


def one_line(exc: ValidationError) -> list[str]:
    """The lines ``dropcut check`` prints (as settings._one_line builds them)."""
    return [f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()]


# --- presets ------------------------------------------------------------------------

PRESET_TABLE: list[tuple[str, dict[str, Any]]] = [
    (
        "transparent",
        {
            "format": "png",
            "background": "transparent",
            "crop": "none",
            "canvas": None,
            "margin": Margin(0, "px"),
            "suffix": "",
            "quality": None,
        },
    ),
    (
        "mask",
        {
            "format": "mask",
            "background": "transparent",
            "crop": "none",
            "canvas": None,
            "suffix": "-mask",
            "quality": None,
        },
    ),
    (
        "white-jpeg",
        {
            "format": "jpeg",
            "background": "#ffffff",
            "crop": "subject",
            "margin": Margin(5, "%"),
            "canvas": None,
            "suffix": "",
            "quality": 92,
        },
    ),
    (
        "amazon",
        {
            "format": "jpeg",
            "background": "#ffffff",
            "crop": "subject",
            "fit": "contain",
            "margin": Margin(150, "px"),
            "canvas": Size(2000, 2000),
            "suffix": "-amazon",
        },
    ),
    (
        "shopify",
        {
            "format": "jpeg",
            "background": "#ffffff",
            "crop": "subject",
            "fit": "contain",
            "canvas": Size(2048, 2048),
            "suffix": "-shopify",
        },
    ),
    (
        "webp",
        {
            "format": "webp",
            "background": "transparent",
            "crop": "none",
            "canvas": None,
            "suffix": "",
            "quality": 92,
        },
    ),
]


def test_every_preset_is_tabled() -> None:
    assert {name for name, _ in PRESET_TABLE} == set(PRESETS)


@pytest.mark.parametrize(("name", "expected"), PRESET_TABLE, ids=[n for n, _ in PRESET_TABLE])
def test_preset_resolves(name: str, expected: dict[str, Any]) -> None:
    resolved = OutputSpec(preset=name).resolve()
    assert resolved.preset is None
    assert {key: getattr(resolved, key) for key in expected} == expected
    assert resolved.crop_threshold == 10
    assert resolved.folder == ""
    # resolving is idempotent, and the preset is the same output as its fields spelled out
    assert resolved.resolve() == resolved
    spelled = OutputSpec(**resolved.model_dump(exclude={"preset"}))
    assert spelled.resolve() == resolved
    assert recipe_key([spelled]) == recipe_key([OutputSpec(preset=name)])


def test_default_recipe_is_todays_output() -> None:
    (spec,) = RECIPE.validate_python(DEFAULT_OUTPUTS)
    assert spec == OutputSpec(preset="transparent").resolve()
    assert spec.extension == "png"
    for rel in ("a.jpg", "shop/x/IMG_1.HEIC", "noext"):
        assert output_names(rel, [spec]) == [next(output_candidates(rel))]


OVERRIDES: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({"preset": "amazon", "quality": 80}, {"quality": 80, "canvas": Size(2000, 2000), "suffix": "-amazon"}),
    ({"preset": "amazon", "suffix": "-az", "folder": "amazon"}, {"suffix": "-az", "folder": "amazon"}),
    ({"preset": "white-jpeg", "format": "png"}, {"format": "png", "background": "#ffffff", "quality": None}),
    ({"preset": "white-jpeg", "margin": "40px"}, {"margin": Margin(40, "px"), "crop": "subject"}),
    ({"preset": "shopify", "background": "#00FF00"}, {"background": "#00ff00", "format": "jpeg"}),
    ({"preset": "shopify", "canvas": "original"}, {"canvas": None, "crop": "subject"}),
    ({"preset": "mask", "suffix": ""}, {"suffix": "", "format": "mask"}),
    ({"preset": "webp", "quality": 70, "crop": "subject"}, {"quality": 70, "crop": "subject"}),
    (
        {"preset": "transparent", "canvas": "800x600", "fit": "cover"},
        {"canvas": Size(800, 600), "fit": "cover"},
    ),
    ({"format": "jpg"}, {"format": "jpeg", "background": "#ffffff", "quality": 92}),
    ({"format": "webp", "background": "#123456"}, {"background": "#123456", "quality": 92}),
    ({"margin": 0}, {"margin": Margin(0, "px")}),
    ({"margin": "2.5%"}, {"margin": Margin(2.5, "%")}),
    ({"canvas": "1200X800"}, {"canvas": Size(1200, 800)}),
]


@pytest.mark.parametrize(("given", "expected"), OVERRIDES)
def test_fields_beside_a_preset_override_it(given: dict[str, Any], expected: dict[str, Any]) -> None:
    resolved = OutputSpec(**given).resolve()
    assert {key: getattr(resolved, key) for key in expected} == expected


def test_resolved_spec_round_trips_through_its_dump() -> None:
    for name in PRESETS:
        resolved = OutputSpec(preset=name, folder="x/y").resolve()
        dumped = resolved.model_dump(mode="json")
        assert dumped["canvas"] in ("original", "2000x2000", "2048x2048")
        assert OutputSpec.model_validate(dumped) == resolved


# --- invalid specs: one line naming the field ----------------------------------------

INVALID: list[tuple[dict[str, Any], str]] = [
    ({"preset": "ebay"}, "preset"),
    ({"format": "gif"}, "format"),
    ({"format": 3}, "format"),
    ({"background": "white"}, "background"),
    ({"background": "#fff"}, "background"),
    ({"background": "#gggggg"}, "background"),
    ({"crop": "box"}, "crop"),
    ({"crop_threshold": -1}, "crop_threshold"),
    ({"crop_threshold": 255}, "crop_threshold"),
    ({"margin": "5"}, "margin"),
    ({"margin": 7}, "margin"),
    ({"margin": "-5%"}, "margin"),
    ({"margin": "101%"}, "margin"),
    ({"margin": "40pt"}, "margin"),
    ({"margin": "1.5px"}, "margin"),
    ({"margin": "20000px"}, "margin"),
    ({"canvas": "2000"}, "canvas"),
    ({"canvas": "0x10"}, "canvas"),
    ({"canvas": "20000x20000"}, "canvas"),
    ({"canvas": "axb"}, "canvas"),
    ({"canvas": 2000}, "canvas"),
    ({"fit": "fill"}, "fit"),
    ({"format": "jpeg", "quality": 0}, "quality"),
    ({"format": "jpeg", "quality": 101}, "quality"),
    ({"suffix": "a/b"}, "suffix"),
    ({"suffix": "a b"}, "suffix"),
    ({"suffix": "~jpg"}, "suffix"),
    ({"suffix": "x" * 65}, "suffix"),
    ({"folder": "/abs"}, "folder"),
    ({"folder": "../x"}, "folder"),
    ({"folder": "a/../b"}, "folder"),
    ({"folder": "a//b"}, "folder"),
    ({"folder": "x/"}, "folder"),
    ({"folder": "./x"}, "folder"),
    ({"folder": "a\\b"}, "folder"),
    ({"folder": "a\nb"}, "folder"),
    ({"folder": ".dropcut-staging"}, "folder"),
    ({"folder": "x" * 256}, "folder"),
    ({"backgroud": "#ffffff"}, "backgroud"),
    # combinations, after the preset's fields are applied
    ({"format": "jpeg", "background": "transparent"}, "background"),
    ({"preset": "transparent", "format": "jpeg"}, "background"),
    ({"format": "mask", "background": "#ffffff"}, "background"),
    ({"preset": "amazon", "format": "mask"}, "background"),
    ({"format": "png", "quality": 90}, "quality"),
    ({"preset": "mask", "quality": 90}, "quality"),
    ({"fit": "cover"}, "fit"),
    ({"preset": "amazon", "canvas": "original", "fit": "cover"}, "fit"),
    ({"canvas": "200x100", "margin": "50px"}, "margin"),
    ({"preset": "amazon", "canvas": "300x300"}, "margin"),
]


@pytest.mark.parametrize(("given", "field"), INVALID)
def test_invalid_spec_is_one_line_naming_the_field(given: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        OutputSpec(**given)
    lines = one_line(info.value)
    assert len(lines) == 1, lines
    assert "\n" not in lines[0]
    assert lines[0].startswith(f"{field}:") or lines[0].startswith(f"config: {field}:"), lines[0]


def test_invalid_spec_in_a_recipe_names_its_position() -> None:
    with pytest.raises(ValidationError) as info:
        RECIPE.validate_python([{"preset": "amazon"}, {"preset": "amazon", "margin": "5"}])
    (line,) = one_line(info.value)
    assert line.startswith("1.margin: ")


# --- collisions --------------------------------------------------------------------

COLLIDING: list[list[dict[str, Any]]] = [
    [{}, {"format": "mask"}],
    [{"preset": "transparent"}, {"preset": "mask", "suffix": ""}],
    [{"format": "jpeg"}, {"preset": "white-jpeg"}],
    [{"suffix": "-X"}, {"suffix": "-x"}],
    [{"folder": "Amazon", "preset": "amazon"}, {"folder": "amazon", "preset": "amazon"}],
    [{"preset": "webp"}, {"preset": "mask"}, {"format": "webp", "background": "#ffffff"}],
]


@pytest.mark.parametrize("specs", COLLIDING)
def test_two_specs_writing_one_name_are_refused(specs: list[dict[str, Any]]) -> None:
    with pytest.raises(ValidationError) as info:
        RECIPE.validate_python(specs)
    (line,) = one_line(info.value)
    first = next(
        i
        for i in range(len(specs))
        if any(
            output_key(output_names("a.jpg", [OutputSpec(**specs[i])])[0])
            == output_key(output_names("a.jpg", [OutputSpec(**specs[j])])[0])
            for j in range(len(specs))
            if j != i
        )
    )
    assert f"outputs {first + 1} (" in line
    assert f"and {len(specs)} (" in line
    assert "would both write" in line


NOT_COLLIDING: list[list[dict[str, Any]]] = [
    [{"preset": name} for name in PRESETS],
    [{"preset": "amazon"}, {"preset": "amazon", "folder": "amazon"}],
    [{}, {"preset": "webp"}, {"format": "jpeg"}],
    [{"suffix": "-a"}, {"suffix": "-b"}],
]


@pytest.mark.parametrize("specs", NOT_COLLIDING)
def test_distinct_names_are_accepted(specs: list[dict[str, Any]]) -> None:
    recipe = RECIPE.validate_python(specs)
    assert all(spec.preset is None for spec in recipe)  # stored resolved
    names = output_names("shop/a.jpg", recipe)
    assert len({output_key(n) for n in names}) == len(names)


def test_empty_recipe_is_refused() -> None:
    with pytest.raises(ValidationError) as info:
        RECIPE.validate_python([])
    assert "at least one output" in one_line(info.value)[0]


# --- names -------------------------------------------------------------------------

NAMES: list[tuple[str, list[dict[str, Any]], list[str]]] = [
    (
        "a.jpg",
        [{"preset": n} for n in PRESETS],
        ["a.png", "a-mask.png", "a.jpg", "a-amazon.jpg", "a-shopify.jpg", "a.webp"],
    ),
    (
        "shop/x/IMG_1.HEIC",
        [{"preset": "amazon", "folder": "amazon"}, {"preset": "mask", "folder": "m/n"}],
        ["amazon/shop/x/IMG_1-amazon.jpg", "m/n/shop/x/IMG_1-mask.png"],
    ),
    ("README", [{}], ["README.png"]),
    ("a.b.tif", [{"format": "webp", "suffix": ".web"}], ["a.b.web.webp"]),
    ("für/Ölbild.png", [{"preset": "white-jpeg", "suffix": "-white"}], ["für/Ölbild-white.jpg"]),
]


@pytest.mark.parametrize(("rel", "specs", "expected"), NAMES)
def test_output_names(rel: str, specs: list[dict[str, Any]], expected: list[str]) -> None:
    assert output_names(rel, [OutputSpec(**s) for s in specs]) == expected


@pytest.mark.parametrize(
    "rel", ["a.jpg", "x/y/A.JPEG", "noext", "é" * 200 + ".jpg", "d/" + "s" * 300 + ".png"]
)
def test_png_candidates_are_those_of_paths(rel: str) -> None:
    ours, theirs = name_candidates(rel, ".png"), output_candidates(rel)
    assert [next(ours) for _ in range(5)] == [next(theirs) for _ in range(5)]


def test_outputs_of_one_input_move_to_the_next_candidate_together() -> None:
    specs = [OutputSpec(), OutputSpec(preset="amazon", folder="az")]
    sets = output_name_sets("shop/a.jpg", specs)
    assert next(sets) == ["shop/a.png", "az/shop/a-amazon.jpg"]
    assert next(sets) == ["shop/a~jpg.png", "az/shop/a~jpg-amazon.jpg"]
    assert next(sets) == ["shop/a~jpg~2.png", "az/shop/a~jpg~2-amazon.jpg"]


@pytest.mark.parametrize("stem", ["s" * 300, "ü" * 200, "a" * 250, "😀" * 70])
def test_long_stems_fit_255_bytes_and_keep_suffix_and_extension(stem: str) -> None:
    specs = [OutputSpec(preset=n) for n in PRESETS]
    for names in (output_names(f"d/{stem}.jpg", specs), list(next(output_name_sets(f"{stem}.jpg", specs)))):
        for name, spec in zip(names, specs, strict=True):
            leaf = name.rsplit("/", 1)[-1]
            assert len(leaf.encode("utf-8")) <= NAME_MAX
            assert leaf.endswith(spec.tail)
        assert len({output_key(n) for n in names}) == len(names)
    sets = output_name_sets(f"{stem}.jpg", specs)
    next(sets)
    for name in next(sets):  # the second candidates too
        assert len(name.encode("utf-8")) <= NAME_MAX


# --- per-folder recipes -------------------------------------------------------------

DEFAULT = RECIPE.validate_python([{"preset": "transparent"}])
AMAZON = RECIPE.validate_python([{"preset": "amazon"}])
WEB = RECIPE.validate_python([{"preset": "webp"}])
DEEP = RECIPE.validate_python([{"preset": "mask"}])
TABLES = {"amazon": AMAZON, "amazon/web": WEB, "shop/a/b": DEEP}

INHERITANCE: list[tuple[str, tuple[OutputSpec, ...]]] = [
    ("a.jpg", DEFAULT),  # the inbox itself
    ("amazon", DEFAULT),  # a file named like a folder key, at the root
    ("amazon/a.jpg", AMAZON),
    ("amazon/x/y/a.jpg", AMAZON),  # inherited by nested subfolders
    ("amazon/web/a.jpg", WEB),  # the longest matching key wins
    ("amazon/web/deeper/a.jpg", WEB),
    ("amazon/webshop/a.jpg", AMAZON),  # by components, not characters
    ("amazonia/a.jpg", DEFAULT),  # a sibling sharing a prefix inherits nothing
    ("Amazon/a.jpg", DEFAULT),  # case-sensitive
    ("other/amazon/a.jpg", DEFAULT),  # keys are anchored at the inbox
    ("shop/a/a.jpg", DEFAULT),  # above a key: not inherited upwards
    ("shop/a/b/c/a.jpg", DEEP),
]


@pytest.mark.parametrize(("rel", "expected"), INHERITANCE)
def test_recipe_for_longest_folder_prefix(rel: str, expected: tuple[OutputSpec, ...]) -> None:
    assert recipe_for(rel, DEFAULT, TABLES) == expected


def test_folder_tables_validate_and_feed_recipe_for() -> None:
    folders = FOLDERS.validate_python(
        {"amazon": {"outputs": [{"preset": "amazon"}]}, "web/x": {"outputs": [{"preset": "webp"}, {}]}}
    )
    recipes = folder_recipes(folders)
    assert recipe_for("web/x/y/a.jpg", DEFAULT, recipes) == WEB + DEFAULT
    assert recipe_for("amazon/a.jpg", DEFAULT, recipes) == AMAZON


@pytest.mark.parametrize(
    ("tables", "needle"),
    [
        ({"/abs": {"outputs": [{}]}}, '[folders."/abs"]'),
        ({"../x": {"outputs": [{}]}}, '[folders."../x"]'),
        ({"a//b": {"outputs": [{}]}}, '[folders."a//b"]'),
        ({"": {"outputs": [{}]}}, "outputs"),  # the root is `outputs`
        ({"x": {"outputs": []}}, "x.outputs"),
        ({"x": {"output": [{}]}}, "x.output"),
        ({"x": {"outputs": [{}, {"format": "mask"}]}}, "x.outputs"),
        ({"x": {"outputs": [{"quality": 0, "format": "jpeg"}]}}, "x.outputs.0.quality"),
    ],
)
def test_invalid_folder_tables(tables: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValidationError) as info:
        FOLDERS.validate_python(tables)
    lines = one_line(info.value)
    assert all("\n" not in line for line in lines)
    assert any(needle in line for line in lines), lines


# --- recipe key --------------------------------------------------------------------


def test_recipe_key_is_stable_short_and_order_free() -> None:
    a = [OutputSpec(preset="amazon"), OutputSpec(preset="mask")]
    key = recipe_key(a)
    assert len(key) == 16 and int(key, 16) >= 0
    assert recipe_key(list(reversed(a))) == key
    assert recipe_key(RECIPE.validate_python([{"preset": "amazon"}, {"preset": "mask"}])) == key
    # pinned: the queue records it, so it must not change between releases by accident
    assert recipe_key(DEFAULT_OUTPUTS) == "27a9b881ba9d54cd"


@pytest.mark.parametrize(
    "other",
    [
        {"preset": "amazon", "quality": 91},
        {"preset": "amazon", "folder": "x"},
        {"preset": "shopify"},
        {"preset": "amazon", "crop_threshold": 11},
        {"preset": "amazon", "margin": "151px"},
    ],
)
def test_recipe_key_changes_with_any_field(other: dict[str, Any]) -> None:
    assert recipe_key([OutputSpec(**other)]) != recipe_key([OutputSpec(preset="amazon")])


# --- subject box -------------------------------------------------------------------


def alpha_with(shape: tuple[int, int], box: tuple[int, int, int, int], value: int = 255) -> np.ndarray:
    alpha = np.zeros(shape, np.uint8)
    x0, y0, x1, y1 = box
    alpha[y0:y1, x0:x1] = value
    return alpha


SUBJECT_BOXES: list[tuple[np.ndarray, int, tuple[int, int, int, int] | None]] = [
    (np.zeros((40, 60), np.uint8), 10, None),
    (np.zeros((0, 0), np.uint8), 10, None),
    (np.full((40, 60), 10, np.uint8), 10, None),  # at the threshold: not subject
    (np.full((40, 60), 11, np.uint8), 10, (0, 0, 60, 40)),
    (np.full((40, 60), 1, np.uint8), 0, (0, 0, 60, 40)),
    (alpha_with((40, 60), (5, 7, 6, 8)), 10, (5, 7, 6, 8)),  # one pixel
    (alpha_with((40, 60), (10, 5, 50, 30)), 10, (10, 5, 50, 30)),
    (alpha_with((40, 60), (0, 0, 60, 40), 254), 253, (0, 0, 60, 40)),
    (alpha_with((40, 60), (0, 0, 60, 40), 254), 254, None),
    (
        np.maximum(alpha_with((40, 60), (20, 10, 30, 20)), alpha_with((40, 60), (0, 35, 60, 40), 9)),
        10,
        (20, 10, 30, 20),
    ),  # a faint edge row below the threshold does not widen it
    (
        np.maximum(alpha_with((40, 60), (20, 10, 30, 20)), alpha_with((40, 60), (2, 3, 4, 5), 30)),
        10,
        (2, 3, 30, 20),
    ),  # two blobs
]


@pytest.mark.parametrize(("alpha", "threshold", "expected"), SUBJECT_BOXES)
def test_subject_box(alpha: np.ndarray, threshold: int, expected: tuple[int, int, int, int] | None) -> None:
    assert subject_box(alpha, threshold) == expected


@pytest.mark.parametrize(
    ("alpha", "threshold"),
    [
        (np.zeros((4, 4, 1), np.uint8), 10),
        (np.zeros((4, 4), np.float32), 10),
        (np.zeros((4, 4), np.uint8), 255),
    ],
)
def test_subject_box_refuses_bad_input(alpha: np.ndarray, threshold: int) -> None:
    with pytest.raises(ValueError):
        subject_box(alpha, threshold)


# --- layout ------------------------------------------------------------------------


def render_alpha(alpha: np.ndarray, lay: Layout) -> np.ndarray:
    """What a renderer does with a layout, nearest-neighbour: the output's alpha."""
    x0, y0, x1, y1 = lay.crop
    w, h = lay.size
    ys = np.minimum((y0 + (np.arange(h) + 0.5) * (y1 - y0) / h).astype(int), alpha.shape[0] - 1)
    xs = np.minimum((x0 + (np.arange(w) + 0.5) * (x1 - x0) / w).astype(int), alpha.shape[1] - 1)
    canvas = np.zeros((lay.canvas[1], lay.canvas[0]), np.uint8)
    canvas[lay.offset[1] : lay.offset[1] + h, lay.offset[0] : lay.offset[0] + w] = alpha[ys][:, xs]
    return canvas


def check_invariants(lay: Layout, image: tuple[int, int]) -> None:
    x0, y0, x1, y1 = lay.crop
    assert 0 <= x0 < x1 <= image[0] and 0 <= y0 < y1 <= image[1]
    bx0, by0, bx1, by1 = lay.bounds
    assert 0 <= bx0 <= x0 and x1 <= bx1 <= image[0] and 0 <= by0 <= y0 and y1 <= by1 <= image[1]
    assert lay.offset[0] >= 0 and lay.offset[0] + lay.size[0] <= lay.canvas[0]
    assert lay.offset[1] >= 0 and lay.offset[1] + lay.size[1] <= lay.canvas[1]
    assert abs(lay.size[0] - (x1 - x0) * lay.scale) <= 1
    assert abs(lay.size[1] - (y1 - y0) * lay.scale) <= 1
    if lay.scale == 1.0:
        assert all(float(v).is_integer() for v in lay.crop)
        assert lay.size == (x1 - x0, y1 - y0)


IMAGE = (3000, 2000)
BOX = (1000, 400, 1600, 1800)  # 600 x 1400, off-centre

CANVASES: list[tuple[str, tuple[int, int]]] = [
    ("transparent", (3000, 2000)),
    ("mask", (3000, 2000)),
    ("webp", (3000, 2000)),
    ("white-jpeg", (600 + 2 * 70, 1400 + 2 * 70)),  # 5 % of the larger side, 1400
    ("amazon", (2000, 2000)),
    ("shopify", (2048, 2048)),
]


def test_every_preset_has_a_canvas_case() -> None:
    assert {name for name, _ in CANVASES} == set(PRESETS)


@pytest.mark.parametrize(("preset", "canvas"), CANVASES)
def test_canvas_size_of_every_preset(preset: str, canvas: tuple[int, int]) -> None:
    lay = layout(IMAGE, BOX, OutputSpec(preset=preset))
    assert lay.canvas == canvas
    check_invariants(lay, IMAGE)


def test_transparent_is_the_photo_unchanged() -> None:
    for size in [(1, 1), (6000, 4000), (17, 3)]:
        assert layout(size, None, OutputSpec()) == Layout((0, 0, *size), 1.0, size, size, (0, 0))


# (image, subject box, spec, expected margin on each side in output pixels or None for cover)
GEOMETRY: list[tuple[tuple[int, int], tuple[int, int, int, int], dict[str, Any]]] = [
    (IMAGE, BOX, {"preset": "amazon"}),
    (IMAGE, BOX, {"preset": "shopify"}),
    (IMAGE, BOX, {"preset": "white-jpeg"}),
    (IMAGE, (100, 900, 2900, 1300), {"preset": "amazon"}),  # wide subject
    (IMAGE, (0, 0, 300, 200), {"preset": "shopify"}),  # at the corner, upscaled
    (IMAGE, (2990, 1990, 3000, 2000), {"preset": "amazon"}),  # tiny, at the far corner
    (IMAGE, BOX, {"crop": "subject", "margin": "40px"}),
    (IMAGE, BOX, {"crop": "subject", "margin": "12%", "canvas": "1080x1350"}),
    (IMAGE, BOX, {"crop": "subject", "margin": "25px", "canvas": "500x300"}),
    ((4000, 6000), (700, 300, 3300, 5900), {"crop": "subject", "margin": "5%", "canvas": "1000x1000"}),
    ((641, 479), (13, 27, 600, 470), {"crop": "subject", "margin": "3%", "canvas": "333x777"}),
]


def expected_margin(spec: OutputSpec, box: tuple[int, int, int, int], scale: float) -> float:
    larger = max(box[2] - box[0], box[3] - box[1])
    if spec.margin.unit == "px":
        return spec.margin.value
    return spec.margin.value / 100 * larger * scale


@pytest.mark.parametrize(("image", "box", "given"), GEOMETRY)
def test_contain_subject_margin_aspect_and_centring(
    image: tuple[int, int], box: tuple[int, int, int, int], given: dict[str, Any]
) -> None:
    spec = OutputSpec(**given).resolve()
    lay = layout(image, box, spec)
    check_invariants(lay, image)
    alpha = alpha_with((image[1], image[0]), box)
    out = subject_box(render_alpha(alpha, lay), 10)
    assert out is not None
    ox0, oy0, ox1, oy1 = out
    cw, ch = lay.canvas
    m = expected_margin(spec, box, lay.scale)
    left, right, top, bottom = ox0, cw - ox1, oy0, ch - oy1
    # the rendered subject is where the layout says (within a pixel)
    px0, py0 = lay.to_canvas(box[0], box[1])
    px1, py1 = lay.to_canvas(box[2], box[3])
    assert max(abs(px0 - ox0), abs(py0 - oy0), abs(px1 - ox1), abs(py1 - oy1)) <= 1
    # centred
    assert abs(left - right) <= 1 and abs(top - bottom) <= 1
    # the margin is what the spec says on the tight axis, at least that on the other
    assert min(left, right, top, bottom) >= m - 1
    assert min(abs(left - m), abs(top - m)) <= 1
    # aspect kept
    bw, bh = box[2] - box[0], box[3] - box[1]
    assert abs((ox1 - ox0) / (oy1 - oy0) - bw / bh) <= 2 / min(oy1 - oy0, ox1 - ox0) * max(1, bw / bh)


def test_amazon_subject_is_85_percent_of_the_canvas() -> None:
    for box in [BOX, (100, 900, 2900, 1300), (10, 10, 20, 30)]:
        lay = layout(IMAGE, box, OutputSpec(preset="amazon"))
        x0, y0 = lay.to_canvas(box[0], box[1])
        x1, y1 = lay.to_canvas(box[2], box[3])
        assert abs(max(x1 - x0, y1 - y0) - 1700) <= 1  # 85 % of 2000


@pytest.mark.parametrize(
    ("image", "box", "given"),
    [
        (IMAGE, BOX, {"crop": "subject", "canvas": "1000x1000", "fit": "cover"}),
        (IMAGE, BOX, {"crop": "subject", "canvas": "1000x500", "fit": "cover", "margin": "20px"}),
        (IMAGE, BOX, {"crop": "none", "canvas": "1000x1000", "fit": "cover"}),
    ],
)
def test_cover_fills_the_canvas_on_one_axis_and_overflows_the_other(
    image: tuple[int, int], box: tuple[int, int, int, int], given: dict[str, Any]
) -> None:
    spec = OutputSpec(**given).resolve()
    lay = layout(image, box, spec)
    check_invariants(lay, image)
    src = box if spec.crop == "subject" else (0, 0, *image)
    m = expected_margin(spec, src, lay.scale)
    x0, y0 = lay.to_canvas(src[0], src[1])
    x1, y1 = lay.to_canvas(src[2], src[3])
    cw, ch = lay.canvas
    # subject plus margin covers the canvas: exactly on one axis, beyond it on the other
    assert x1 - x0 + 2 * m >= cw - 1 and y1 - y0 + 2 * m >= ch - 1
    assert min(abs(x1 - x0 + 2 * m - cw), abs(y1 - y0 + 2 * m - ch)) <= 1
    assert abs((x0 + x1) / 2 - cw / 2) <= 1 and abs((y0 + y1) / 2 - ch / 2) <= 1


LAYOUTS: list[tuple[tuple[int, int], tuple[int, int, int, int] | None, dict[str, Any], Layout]] = [
    # a border around the whole photo
    ((200, 100), None, {"margin": "10px"}, Layout((0, 0, 200, 100), 1.0, (200, 100), (220, 120), (10, 10))),
    ((200, 100), None, {"margin": "5%"}, Layout((0, 0, 200, 100), 1.0, (200, 100), (220, 120), (10, 10))),
    # crop to the subject; the margin beyond the photo's edge is background
    (
        (200, 200),
        (0, 0, 100, 100),
        {"crop": "subject", "margin": "10px"},
        Layout((0, 0, 110, 110), 1.0, (110, 110), (120, 120), (10, 10)),
    ),
    (
        (200, 200),
        (50, 60, 70, 90),
        {"crop": "subject"},
        Layout((50, 60, 70, 90), 1.0, (20, 30), (20, 30), (0, 0)),
    ),
    # crop = subject without any subject: the whole photo
    ((200, 100), None, {"crop": "subject"}, Layout((0, 0, 200, 100), 1.0, (200, 100), (200, 100), (0, 0))),
    # crop = none ignores the box; contain a 2:1 photo in a square
    (
        (200, 100),
        (5, 5, 6, 6),
        {"canvas": "100x100"},
        Layout((0, 0, 200, 100), 0.5, (100, 50), (100, 100), (0, 25)),
    ),
]


@pytest.mark.parametrize(("image", "box", "given", "expected"), LAYOUTS)
def test_layout_table(
    image: tuple[int, int], box: tuple[int, int, int, int] | None, given: dict[str, Any], expected: Layout
) -> None:
    assert layout(image, box, OutputSpec(**given)) == expected


@pytest.mark.parametrize(
    ("image", "box"),
    [((0, 10), None), ((10, 10), (5, 5, 5, 9)), ((10, 10), (0, 0, 11, 10)), ((10, 10), (-1, 0, 5, 5))],
)
def test_layout_refuses_bad_sizes(image: tuple[int, int], box: tuple[int, int, int, int] | None) -> None:
    with pytest.raises(ValueError):
        layout(image, box, OutputSpec(crop="subject"))
