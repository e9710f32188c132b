"""Output recipes end to end (issue 11): every deliverable from one matte, chosen per
folder; the pure rules are in test_recipes.py, the pixel work in test_compose.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dropcut.recipes import OutputSpec, layout, subject_box
from dropcut.settings import Settings
from tests import photos
from tests.fake_api import FakeWithoutBG
from tests.support import REPO, Folders, InProcessDaemon, drop, wait_for

ALL_PRESETS = [
    {"preset": "transparent"},
    {"preset": "mask"},
    {"preset": "white-jpeg"},
    {"preset": "amazon"},
    {"preset": "shopify"},
    {"preset": "webp"},
]


def test_one_matte_gives_every_preset(folders: Folders, api: FakeWithoutBG, tmp_path: Path) -> None:
    photo = photos.scene((1200, 800))
    src = tmp_path / "shoe.jpg"
    photo.save(src, "JPEG", quality=92)
    settings = Settings(**folders.values(api.url, api_mode="matte", outputs=ALL_PRESETS))
    with InProcessDaemon(settings) as run:
        drop(folders.inbox, "shop/shoe.jpg", src.read_bytes())
        wait_for(lambda: (folders.archive / "shop" / "shoe.jpg").exists(), timeout=60)
        written = sorted(e["output"] for e in run.logs.events("output_written"))
    assert written == [
        "shop/shoe-amazon.jpg",
        "shop/shoe-mask.png",
        "shop/shoe-shopify.jpg",
        "shop/shoe.jpg",
        "shop/shoe.png",
        "shop/shoe.webp",
    ]
    assert len(api.records()) == 1, "one request for all six outputs"
    out = folders.outbox / "shop"
    expect = {
        "shoe.png": ("PNG", "RGBA", (1200, 800)),
        "shoe-mask.png": ("PNG", "L", (1200, 800)),
        "shoe-amazon.jpg": ("JPEG", "RGB", (2000, 2000)),
        "shoe-shopify.jpg": ("JPEG", "RGB", (2048, 2048)),
        "shoe.webp": ("WEBP", "RGBA", (1200, 800)),
    }
    for name, (fmt, mode, size) in expect.items():
        with Image.open(out / name) as img:
            assert (img.format, img.mode, img.size) == (fmt, mode, size), name
    with Image.open(out / "shoe-mask.png") as mask:
        alpha = np.asarray(mask)
    box = subject_box(alpha, 10)  # the fake's matte: a centred ellipse
    assert box is not None
    wanted = layout((1200, 800), box, OutputSpec(preset="white-jpeg"))
    with Image.open(out / "shoe.jpg") as white:  # cropped to the subject, 5 % margin
        assert white.format == "JPEG" and white.mode == "RGB"
        assert white.size == wanted.canvas
        assert white.getpixel((0, 0)) == (255, 255, 255)
    with Image.open(out / "shoe-amazon.jpg") as amazon:
        assert amazon.getpixel((5, 5)) == (255, 255, 255)
        assert amazon.getpixel((1000, 1000)) != (255, 255, 255)  # the subject, centred


def test_each_folder_gets_its_own_recipe(folders: Folders, api: FakeWithoutBG, tmp_path: Path) -> None:
    src = tmp_path / "p.jpg"
    photos.scene().save(src, "JPEG", quality=92)
    settings = Settings(
        **folders.values(
            api.url,
            api_mode="matte",
            folders={"amazon": {"outputs": [{"preset": "amazon"}]}, "web": {"outputs": [{"preset": "webp"}]}},
        )
    )
    with InProcessDaemon(settings):
        for rel in ("a.jpg", "amazon/b.jpg", "amazon/sub/c.jpg", "web/d.jpg"):
            drop(folders.inbox, rel, src.read_bytes())
        wait_for(lambda: len(list(folders.archive.rglob("*.jpg"))) == 4, timeout=60)
    assert folders.files(folders.outbox) == [
        "a.png",
        "amazon/b-amazon.jpg",
        "amazon/sub/c-amazon.jpg",
        "web/d.webp",
    ]
    assert len(api.records()) == 1, "the same photo: one matte, from the cache after the first"


def test_an_invalid_spec_is_refused_at_check_naming_the_field(folders: Folders, tmp_path: Path) -> None:
    config = tmp_path / "dropcut.toml"
    config.write_text(
        f'inbox = "{folders.inbox}"\noutbox = "{folders.outbox}"\nquarantine = "{folders.quarantine}"\n'
        f'archive = "{folders.archive}"\nstate_dir = "{folders.state}"\napi_key = "k"\n'
        'outputs = [{format = "jpeg", background = "transparent"}]\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "dropcut.cli", "check", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    (line,) = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert "background" in line and "jpeg" in line


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dropcut.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_rerender_applies_todays_recipe_from_the_cached_matte_without_a_request(
    folders: Folders, api: FakeWithoutBG, tmp_path: Path
) -> None:
    """Changing a recipe costs no credit: the archived input is rendered again from its
    cached matte with the recipe that applies now; the server sees nothing."""
    src = tmp_path / "p.jpg"
    photos.scene().save(src, "JPEG", quality=92)
    with InProcessDaemon(Settings(**folders.values(api.url, api_mode="matte"))):
        drop(folders.inbox, "shop/shoe.jpg", src.read_bytes())
        wait_for(lambda: (folders.archive / "shop" / "shoe.jpg").exists(), timeout=30)
    assert folders.files(folders.outbox) == ["shop/shoe.png"]
    requests = len(api.records())
    recipe = '[{"preset": "white-jpeg"}, {"preset": "mask"}]'
    done = _cli(folders.env(api.url, api_mode="matte", outputs=recipe), "rerender", "--all")
    assert done.returncode == 0, done.stderr
    assert "rerendered shop/shoe.jpg -> shop/shoe.jpg, shop/shoe-mask.png" in done.stdout
    assert folders.files(folders.outbox) == ["shop/shoe-mask.png", "shop/shoe.jpg", "shop/shoe.png"]
    with Image.open(folders.outbox / "shop" / "shoe.jpg") as out:
        assert out.format == "JPEG" and out.mode == "RGB"
    assert len(api.records()) == requests, "no request: the matte came from the cache"
    # a named input that was never done, and one whose matte is gone, say so
    (folders.state / "results").joinpath(next(p.name for p in (folders.state / "results").iterdir())).unlink()
    done = _cli(
        folders.env(api.url, api_mode="matte", outputs=recipe), "rerender", "shop/shoe.jpg", "nope.jpg"
    )
    assert done.returncode == 1
    assert "shop/shoe.jpg: its matte is no longer cached" in done.stderr
    assert "nope.jpg: no done input of that name" in done.stderr


# ``python -c KILL_ON_SECOND_OUTPUT <outbox> run``: the daemon, killed with SIGKILL by the
# kernel's hand at the moment it renames its second output into the outbox (the first one
# is in place, the input not yet disposed of). os.rename is replaced in the daemon's process
# only: the file system's side of the moment, not dropcut's code.
KILL_ON_SECOND_OUTPUT = r"""
import os, signal, sys
outbox = sys.argv[1]
real_rename = os.rename
placed = []

def rename(src, dst, *args, dst_dir_fd=None, **kwargs):
    if dst_dir_fd is not None and os.path.realpath(f"/proc/self/fd/{dst_dir_fd}").startswith(outbox):
        placed.append(dst)
        if len(placed) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_rename(src, dst, *args, dst_dir_fd=dst_dir_fd, **kwargs)

os.rename = rename
from dropcut.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_kill9_between_two_outputs_finishes_the_set_after_restart(
    folders: Folders, api: FakeWithoutBG, tmp_path: Path, spawn: Any
) -> None:
    """All or nothing per input: killed between placing two outputs of one input, the
    restarted daemon renders the whole set again from the cached matte (no request) and
    only then archives the input."""
    from dataclasses import dataclass

    from tests.support import DaemonProcess

    @dataclass
    class Killed(DaemonProcess):
        def command(self) -> list[str]:
            return [sys.executable, "-c", KILL_ON_SECOND_OUTPUT, str(folders.outbox.resolve())]

    src = tmp_path / "p.jpg"
    photos.scene().save(src, "JPEG", quality=92)
    recipe = '[{"preset": "transparent"}, {"preset": "white-jpeg", "suffix": "-white"}, {"preset": "mask"}]'
    env = folders.env(api.url, api_mode="matte", outputs=recipe)
    drop(folders.inbox, "shoe.jpg", src.read_bytes())
    first = spawn(env, Killed)
    assert first.wait(timeout=60) == -9
    assert len(folders.files(folders.outbox)) == 1, "killed after one output of three"
    assert (folders.inbox / "shoe.jpg").exists(), "the input waits for the whole set"
    second = spawn(env)
    wait_for(lambda: (folders.archive / "shoe.jpg").exists(), timeout=60)
    second.stop()
    assert folders.files(folders.outbox) == ["shoe-mask.png", "shoe-white.jpg", "shoe.png"]
    assert len(api.records()) == 1, "the set was finished from the cached matte"
