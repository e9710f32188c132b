"""A folder swapped for a link between the check and the listing is never listed
(watch.scan and the poll emitter open each folder without following links and list
it through that descriptor). The swap is made deterministic by a hook at that point."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from watchdog.observers.api import EventQueue, ObservedWatch

from dropcut.watch import FolderPollEmitter, scan


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    inbox = tmp_path / "inbox"
    (inbox / "album" / "deeper").mkdir(parents=True)
    (inbox / "album" / "a.jpg").write_bytes(b"a")
    (inbox / "album" / "deeper" / "b.jpg").write_bytes(b"b")
    (inbox / "top.jpg").write_bytes(b"t")
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "secret.jpg").write_bytes(b"s")
    (outside / "sub" / "secret2.jpg").write_bytes(b"s")
    return inbox, outside


def swap_for_link(folder: Path, target: Path) -> None:
    folder.rename(folder.with_name(folder.name + ".gone"))
    folder.symlink_to(target, target_is_directory=True)


# (id, folder swapped, folders scanned from)
SWAPS = [
    ("top-level", "album", ""),
    ("nested", "album/deeper", ""),
    ("nested-from-a-subfolder-scan", "album/deeper", "album"),
]


@pytest.mark.parametrize(("swapped", "start"), [s[1:] for s in SWAPS], ids=[s[0] for s in SWAPS])
def test_scan_never_lists_a_folder_swapped_for_a_link_after_the_check(
    tree: tuple[Path, Path], swapped: str, start: str
) -> None:
    inbox, outside = tree

    def skip_dir(rel: str) -> bool:
        if rel == swapped:  # checked: a real folder. Now, before it is listed, a link.
            swap_for_link(inbox / rel, outside)
        return False

    found = set(scan(inbox, skip_dir, start))
    assert not any("secret" in rel for rel in found), found
    assert swapped in found  # reported like a file: inspect rejects the link
    if start == "":
        assert "top.jpg" in found


def test_scan_of_a_start_folder_that_is_a_link_lists_nothing_behind_it(tree: tuple[Path, Path]) -> None:
    inbox, outside = tree
    (inbox / "linked").symlink_to(outside, target_is_directory=True)
    assert list(scan(inbox, lambda rel: False, "linked")) == ["linked"]


@pytest.fixture
def swap_before_listing(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path, Path], None]:
    """Arm: the next os.scandir of ``folder`` (by path, or through an fd of it) first swaps
    ``folder`` for a link to ``target``."""
    real = os.scandir
    armed: dict[str, Path] = {}

    def scandir(path: Any = ".") -> Any:
        where = os.readlink(f"/proc/self/fd/{path}") if isinstance(path, int) else os.fspath(path)
        target = armed.pop(os.fsdecode(where), None)
        if target is not None:
            swap_for_link(Path(os.fsdecode(where)), target)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)

    def arm(folder: Path, target: Path) -> None:
        armed[str(folder)] = target

    return arm


def emitter_events(inbox: Path) -> tuple[FolderPollEmitter, Callable[[], Iterator[str]]]:
    queue = EventQueue()
    emitter = FolderPollEmitter(queue, ObservedWatch(str(inbox), recursive=True), timeout=0.01)

    def drain() -> Iterator[str]:
        while not queue.empty():
            event, _ = queue.get_nowait()
            yield os.fsdecode(event.src_path)

    return emitter, drain


def test_the_poll_emitter_never_lists_a_folder_swapped_for_a_link(
    tree: tuple[Path, Path], swap_before_listing: Callable[[Path, Path], None]
) -> None:
    inbox, outside = tree
    emitter, drain = emitter_events(inbox)
    emitter.on_thread_start()  # the first listing: album and album/deeper are known folders
    (inbox / "album" / "new.jpg").write_bytes(b"n")
    swap_before_listing(inbox / "album" / "deeper", outside)
    emitter.queue_events(0)
    paths = list(drain())
    assert not any("secret" in p for p in paths), paths
    assert str(inbox / "album" / "new.jpg") in paths  # the rest of the poll went on


def test_the_poll_emitter_never_enters_a_new_folder_swapped_for_a_link(
    tree: tuple[Path, Path], swap_before_listing: Callable[[Path, Path], None]
) -> None:
    inbox, outside = tree
    emitter, drain = emitter_events(inbox)
    emitter.on_thread_start()
    (inbox / "fresh").mkdir()
    swap_before_listing(inbox / "fresh", outside)
    emitter.queue_events(0)
    paths = list(drain())
    assert not any("secret" in p for p in paths), paths
