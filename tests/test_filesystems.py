"""Outbox, archive and quarantine on another file system (a tmpfs mounted by the test,
the inbox on the normal disk): moves become copy + fsync + rename + unlink, and a crash at
any moment leaves a file in one place or in both, never in none."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from dropcut.paths import STAGING_DIR, numbered_candidates
from dropcut.publish import clean_staging, move_in
from tests.fake_api import FakeWithoutBG
from tests.support import REPO, Folders, InProcessDaemon, drop, image_bytes, wait_for


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh tmpfs mounted for this test (and unmounted after it)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=128m,mode=0755", "dropcut-test", str(mnt)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=True)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def padded_png(size: tuple[int, int], pad: int, seed: int) -> bytes:
    """A small valid PNG made large by a private ancillary chunk (decoders skip it): a
    multi-megabyte file that costs no pixels to render."""
    png = image_bytes("PNG", size, seed=seed)
    body = random.Random(seed).randbytes(pad)
    chunk = struct.pack(">I", len(body)) + b"prVt" + body
    chunk += struct.pack(">I", zlib.crc32(b"prVt" + body) & 0xFFFFFFFF)
    return png[:33] + chunk + png[33:]  # after the 8-byte signature and the IHDR chunk


def staging_leftovers(*roots: Path) -> list[str]:
    return [str(p) for root in roots if (root / STAGING_DIR).is_dir() for p in (root / STAGING_DIR).iterdir()]


# ---------------------------------------------------------------------------------------
# The daemon with its output folders on a tmpfs
# ---------------------------------------------------------------------------------------


def test_outputs_archive_and_quarantine_on_another_file_system(
    tmp_path: Path, tmpfs: Path, api: FakeWithoutBG
) -> None:
    folders = Folders.make(tmp_path)
    settings = folders.settings(
        api.url,
        watch_mode="poll",
        poll_interval_seconds=0.1,
        debounce_seconds=0.1,
        outbox=tmpfs / "outbox",
        archive=tmpfs / "archive",
        quarantine=tmpfs / "quarantine",
    )
    inputs = {
        "a.jpg": image_bytes("JPEG", (80, 60), seed=1),
        "sub/deeper/b.png": image_bytes("PNG", (50, 40), seed=2),
        "big.png": padded_png((40, 30), 3 << 20, seed=3),  # 3 MiB: several copy chunks
    }
    junk = b"%PDF-1.4 not an image\n" * 20
    with InProcessDaemon(settings) as run:
        for rel, data in inputs.items():
            drop(folders.inbox, rel, data)
        drop(folders.inbox, "sub/junk.jpg", junk)
        drop(folders.inbox, "sub/deeper/empty.png", b"")
        for rel in inputs:
            wait_for(lambda r=rel: (settings.archive / r).exists(), timeout=15)
        wait_for(lambda: len(run.logs.events("file_quarantined")) == 2)
        assert not run.logs.events("job_failed") and not run.logs.events("quarantine_failed")
    tmpfs_dev = os.stat(tmpfs).st_dev
    assert os.stat(folders.inbox).st_dev != tmpfs_dev, "the test needs two file systems"
    for rel, data in inputs.items():
        archived = settings.archive / rel
        assert archived.read_bytes() == data
        assert os.stat(archived).st_dev == tmpfs_dev
        with Image.open((settings.outbox / rel).with_suffix(".png")) as out, Image.open(archived) as src:
            assert out.format == "PNG" and out.size == src.size
    assert (settings.quarantine / "sub/junk.jpg").read_bytes() == junk
    assert (settings.quarantine / "sub/deeper/empty.png").read_bytes() == b""
    record = json.loads((settings.quarantine / "sub/junk.jpg.error.json").read_text())
    assert record["error"]["status"] == 415
    assert staging_leftovers(settings.outbox, settings.archive, settings.quarantine) == []
    assert [p for p in folders.inbox.rglob("*") if p.is_file()] == []
    assert sorted(r.sha256 or "" for r in api.records()) == sorted(sha(d) for d in inputs.values())


def test_a_move_across_file_systems_keeps_the_modification_time(tmp_path: Path, tmpfs: Path) -> None:
    size = 3_000
    src_root = tmp_path / "inbox"
    src_root.mkdir()
    data = random.Random(size).randbytes(size)
    (src_root / "a.jpg").write_bytes(data)
    old = 1_600_000_000_123_456_789
    os.utime(src_root / "a.jpg", ns=(old, old))
    assert move_in(src_root, "a.jpg", tmpfs / "archive", numbered_candidates("a.jpg")) == "a.jpg"
    moved = tmpfs / "archive" / "a.jpg"
    assert moved.read_bytes() == data and not (src_root / "a.jpg").exists()
    assert os.stat(moved).st_mtime_ns == old


# ---------------------------------------------------------------------------------------
# SIGKILL during a move across file systems
# ---------------------------------------------------------------------------------------

MOVER = r"""
import os, sys
from pathlib import Path
from dropcut.paths import numbered_candidates
from dropcut.publish import move_in

print("ready", flush=True)
for line in sys.stdin:
    src_root, rel, dst_root, sha = line.rstrip("\n").split("\t")
    pid = os.fork()  # this helper is single-threaded: forking is safe and fast
    if pid == 0:
        try:
            move_in(Path(src_root), rel, Path(dst_root), numbered_candidates(rel), sha256=sha)
        except BaseException:
            os._exit(1)
        os._exit(0)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(status, flush=True)
"""


class Mover:
    """Runs ``publish.move_in`` in a forked child of a helper process, on request."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO / "daemon")}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", MOVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        assert self._line() == "ready"

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the mover helper died"
        return line.strip()

    def start(self, src_root: Path, rel: str, dst_root: Path, digest: str) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{src_root}\t{rel}\t{dst_root}\t{digest}\n")
        self.proc.stdin.flush()
        return int(self._line())

    def wait(self) -> int:
        return int(self._line())  # the raw wait status

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)


def test_a_crash_during_a_move_across_file_systems_never_loses_the_file(tmp_path: Path, tmpfs: Path) -> None:
    src_root = tmp_path / "inbox"  # on the disk
    dst_root = tmpfs / "archive"  # on the tmpfs
    (src_root / "sub").mkdir(parents=True)
    rel = "sub/big.bin"
    data = random.Random(7).randbytes(24 << 20)
    digest = sha(data)
    pristine = src_root / "pristine.bin"  # keeps the bytes; each round links them in again
    pristine.write_bytes(data)
    src, dst = src_root / rel, dst_root / rel

    def reset() -> None:
        if not src.exists():
            os.link(pristine, src)
        dst.unlink(missing_ok=True)
        clean_staging(dst_root)

    mover = Mover()
    try:
        # one move without a kill, to know how long a move takes here
        reset()
        started = time.monotonic()
        mover.start(src_root, rel, dst_root, digest)
        assert mover.wait() == 0
        full = time.monotonic() - started
        assert not src.exists() and sha_file(dst) == digest

        rng = random.Random(1234)
        rounds = 16
        seen: set[str] = set()
        for i in range(rounds):
            reset()
            # random moments spread over the whole move (and a little after it)
            delay = rng.uniform(i, i + 1) * full * 1.1 / rounds
            pid = mover.start(src_root, rel, dst_root, digest)
            time.sleep(delay)  # letting the move run for a while is the thing under test
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            mover.wait()
            at_src, at_dst = src.exists(), dst.exists()
            assert at_src or at_dst, f"round {i} (kill after {delay * 1000:.0f} ms): the file is gone"
            if at_dst:
                assert sha_file(dst) == digest, f"round {i}: incomplete file under its final name"
            if at_src:
                assert os.stat(src).st_size == len(data)
            partial = staging_leftovers(dst_root)
            seen.add(
                "both" if at_src and at_dst else "dst" if at_dst else "src+partial" if partial else "src"
            )
            # what the daemon does after a restart: sweep staging, finish the move
            clean_staging(dst_root)
            assert move_in(src_root, rel, dst_root, numbered_candidates(rel), sha256=digest) == (
                rel if at_src else None
            )
            assert not src.exists() and sha_file(dst) == digest
            assert sorted(p.name for p in dst.parent.iterdir()) == ["big.bin"], "a second copy was made"
            assert staging_leftovers(dst_root) == []
    finally:
        mover.close()
    # the kills landed in different phases of the move
    assert len(seen) >= 2, seen


def test_a_move_to_another_file_system_keeps_the_mode(
    tmp_path: Path, tmpfs: Path, api: FakeWithoutBG
) -> None:
    """Issue 9 item 17: archiving across file systems copies, and the copy keeps the
    input's permission bits (0600 stays 0600), as a rename would."""
    folders = Folders.make(tmp_path / "f")
    folders.archive = tmpfs / "archive"
    with InProcessDaemon(folders.settings(api.url)):
        path = folders.inbox / "private.jpg"
        tmp = folders.inbox / ".private.jpg.tmp"
        tmp.write_bytes(image_bytes(seed=1701))
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        wait_for(lambda: (folders.archive / "private.jpg").exists())
    assert (folders.archive / "private.jpg").stat().st_mode & 0o7777 == 0o600
