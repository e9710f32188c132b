"""Atomic writes and moves into outbox, archive and quarantine.

Rules that hold for every function here:
- nothing appears under a final name unless it is complete and fsynced: files are finished
  in ``<root>/.dropcut-staging/`` (same file system as the final name) and renamed;
- nothing is overwritten by accident: moves pick a free name (``name~2.ext``…), only an
  output of the same input is replaced (atomically, by rename);
- links are never followed: folders are walked one component at a time with
  ``O_NOFOLLOW`` relative to a directory handle, and renames work on those handles;
- a move to another file system copies, fsyncs, renames, and only then unlinks the
  source, so a crash leaves the file in one place or in both, never in none.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from dropcut.inspect import open_dir_nofollow, stat_entry
from dropcut.paths import STAGING_DIR, Layout, error_json_rel, held_original, held_rel, numbered_candidates

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
COPY_CHUNK = 1024 * 1024


@contextmanager
def _dir(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def make_dirs(root: Path, rel_dir: str) -> int:
    """Create ``root/rel_dir`` as needed without following links; return its fd."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, DIR_FLAGS)
    try:
        for part in PurePosixPath(rel_dir).parts:
            if part in ("", "."):
                continue
            if part == "..":
                raise OSError(errno.EINVAL, "'..' in a relative path", rel_dir)
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            child = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def staging_dir(root: Path) -> Path:
    path = root / STAGING_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def new_staging_file(root: Path, suffix: str = ".part") -> Path:
    """A fresh, unused name in ``root``'s staging folder."""
    return staging_dir(root) / f"{secrets.token_hex(8)}{suffix}"


def clean_staging(root: Path) -> int:
    """Remove what a crash left in ``root``'s staging folder; returns how many."""
    path = root / STAGING_DIR
    removed = 0
    if not path.is_dir() or path.is_symlink():
        return 0
    for entry in os.scandir(path):
        if entry.is_file(follow_symlinks=False) or entry.is_symlink():
            os.unlink(entry.path)
            removed += 1
    return removed


def fsync_dir(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:  # some network file systems refuse fsync on directories
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def place(staged: Path, root: Path, rel_path: str) -> None:
    """Rename a finished staging file to ``root/rel_path``, replacing an older output of
    the same name atomically (used for outputs only)."""
    rel = PurePosixPath(rel_path)
    with _dir(make_dirs(root, str(rel.parent))) as dst, _dir(os.open(staged.parent, DIR_FLAGS)) as src:
        os.rename(staged.name, rel.name, src_dir_fd=src, dst_dir_fd=dst)
        fsync_dir(dst)


def copy_to_staging(source: Path, root: Path) -> Path:
    """Copy a file of ours (cache, spool) into ``root``'s staging folder, fsynced."""
    staged = new_staging_file(root)
    copy_synced(source, staged)
    return staged


def copy_synced(source: Path, dest: Path) -> None:
    """Copy ``source`` to the new file ``dest`` and fsync it; on any failure (a full disk)
    no half copy is left at ``dest``."""
    try:
        with source.open("rb") as src, dest.open("wb") as dst:
            shutil.copyfileobj(src, dst, COPY_CHUNK)
            dst.flush()
            os.fsync(dst.fileno())
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


def write_json(root: Path, rel_path: str, data: dict[str, Any]) -> None:
    """Write ``root/rel_path`` as JSON atomically (replacing an older one)."""
    staged = new_staging_file(root, ".json")
    try:
        with staged.open("w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, ensure_ascii=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        place(staged, root, rel_path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise


def _sha256_at(name: str, dir_fd: int) -> str | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    digest = hashlib.sha256()
    with os.fdopen(fd, "rb") as fh:
        while chunk := fh.read(COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def move_in(
    src_root: Path,
    src_rel: str,
    dst_root: Path,
    candidates: Iterable[str],
    *,
    sha256: str | None = None,
) -> str | None:
    """Move ``src_root/src_rel`` to the first free name among ``candidates`` below
    ``dst_root``; returns the name used, or None when the source is gone.

    When a candidate already holds the very same content (``sha256`` given), the move was
    completed before a crash: the source is only unlinked.
    """
    src_rel_p = PurePosixPath(src_rel)
    try:
        src_fd = open_dir_nofollow(src_root, str(src_rel_p.parent))
    except FileNotFoundError:
        return None
    with _dir(src_fd):
        try:
            st = os.stat(src_rel_p.name, dir_fd=src_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", src_rel)
        for dst_rel in candidates:
            dst_rel_p = PurePosixPath(dst_rel)
            with _dir(make_dirs(dst_root, str(dst_rel_p.parent))) as dst_fd:
                if _exists(dst_rel_p.name, dst_fd):
                    if sha256 is not None and _sha256_at(dst_rel_p.name, dst_fd) == sha256:
                        os.unlink(src_rel_p.name, dir_fd=src_fd)
                        fsync_dir(src_fd)
                        return dst_rel
                    continue
                try:
                    os.rename(src_rel_p.name, dst_rel_p.name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                    _copy_across(src_fd, src_rel_p.name, dst_root, dst_fd, dst_rel_p.name)
                fsync_dir(dst_fd)
                fsync_dir(src_fd)
                return dst_rel
    raise FileExistsError(errno.EEXIST, "every candidate name is taken", src_rel)


def _copy_across(src_fd: int, src_name: str, dst_root: Path, dst_fd: int, dst_name: str) -> None:
    """Copy + fsync + rename + unlink: the slow, crash-safe move between file systems."""
    staged = new_staging_file(dst_root)
    try:
        fd = os.open(src_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_fd)
        with os.fdopen(fd, "rb") as src, staged.open("wb") as dst:
            shutil.copyfileobj(src, dst, COPY_CHUNK)
            dst.flush()
            st = os.fstat(src.fileno())
            # A move keeps the file's permission bits and times, whichever way it goes
            # (a rename keeps them by nature).
            os.fchmod(dst.fileno(), stat.S_IMODE(st.st_mode))
            os.utime(dst.fileno(), ns=(st.st_atime_ns, st.st_mtime_ns))
            os.fsync(dst.fileno())
        with _dir(os.open(staged.parent, DIR_FLAGS)) as stage_fd:
            os.rename(staged.name, dst_name, src_dir_fd=stage_fd, dst_dir_fd=dst_fd)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    fsync_dir(dst_fd)
    os.unlink(src_name, dir_fd=src_fd)


def delete_input(root: Path, rel_path: str) -> bool:
    """Unlink an input (``on_success = delete``) without following links."""
    rel = PurePosixPath(rel_path)
    try:
        fd = open_dir_nofollow(root, str(rel.parent))
    except FileNotFoundError:
        return False
    with _dir(fd):
        try:
            os.unlink(rel.name, dir_fd=fd)
        except FileNotFoundError:
            return False
        fsync_dir(fd)
    return True


def pick_free(root: Path, candidates: Iterable[str]) -> str:
    """The first candidate name that does not exist below ``root`` (links not followed)."""
    for rel in candidates:
        rel_p = PurePosixPath(rel)
        with _dir(make_dirs(root, str(rel_p.parent))) as fd:
            if not _exists(rel_p.name, fd):
                return rel
    raise AssertionError("candidates is endless")


def _put_back(dir_fd: int, held: str, rel_path: str) -> str:
    """Give a held input its name back without overwriting what may have been saved under
    that name meanwhile: a hard link to the first free name among ``rel_path``,
    ``name~2.ext``… (atomic: fails if the name exists), then the private name is removed.
    On a file system without hard links, a rename to a name that does not exist."""
    held_st = os.stat(held, dir_fd=dir_fd, follow_symlinks=False)
    for candidate in numbered_candidates(rel_path):
        name = PurePosixPath(candidate).name
        try:
            os.link(held, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        except FileExistsError:
            there = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if (there.st_dev, there.st_ino) != (held_st.st_dev, held_st.st_ino):
                continue  # another file: try the next name
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            if _exists(name, dir_fd):
                continue
            os.rename(held, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            fsync_dir(dir_fd)
            return candidate
        os.unlink(held, dir_fd=dir_fd)
        fsync_dir(dir_fd)
        return candidate
    raise AssertionError("candidates is endless")


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class Publisher:
    """The file-system side of finishing a job: outputs, archive, quarantine."""

    def __init__(self, layout: Layout, *, on_success: str, clock: Callable[[], float]) -> None:
        self.layout = layout
        self.on_success = on_success
        self._clock = clock

    def prepare(self) -> dict[str, int]:
        """Create the folders and sweep what a crash left in staging."""
        swept = {}
        for root in self.layout.output_roots():
            root.mkdir(parents=True, exist_ok=True)
            swept[str(root)] = clean_staging(root)
        return swept

    def source_state(self, rel_path: str, identity: tuple[int | None, ...]) -> str:
        """Is ``inbox/rel_path`` still the file a job was made from? ``present`` (same
        size, mtime, ctime, inode and device), ``changed`` (something else is there now)
        or ``gone``; links are not followed. Raises OSError when the inbox cannot be
        read (EACCES, EIO: the caller cannot tell)."""
        st = stat_entry(self.layout.inbox, rel_path)
        if st is None:
            return "gone"
        size, mtime_ns, ctime_ns, inode, device = identity
        same = stat.S_ISREG(st.st_mode) and (
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
            st.st_ino,
            st.st_dev,
        ) == (size, mtime_ns, ctime_ns, inode, device)
        return "present" if same else "changed"

    def content_of(self, rel_path: str) -> tuple[tuple[int, int, int, int, int], str] | None:
        """The signature (size, mtime, ctime, inode, device) and sha256 of the regular file
        at ``inbox/rel_path``, read on one descriptor opened without following links (the
        signature taken after the read: a file written meanwhile shows as changed); None
        when there is none. Raises OSError when it cannot be read."""
        rel = PurePosixPath(rel_path)
        try:
            dir_fd = open_dir_nofollow(self.layout.inbox, str(rel.parent))
        except FileNotFoundError:
            return None
        with _dir(dir_fd):
            try:
                fd = os.open(
                    rel.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
                )
            except FileNotFoundError:
                return None
            with os.fdopen(fd, "rb") as fh:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    return None
                digest = hashlib.sha256()
                while chunk := fh.read(COPY_CHUNK):
                    digest.update(chunk)
                st = os.fstat(fd)
        return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev), digest.hexdigest()

    def identity_matches(self, rel_path: str, identity: tuple[int | None, ...]) -> bool:
        """:meth:`source_state` is ``present``; any doubt (an error, a link) is False."""
        if any(part is None for part in identity):
            return False
        try:
            return self.source_state(rel_path, identity) == "present"
        except OSError:
            return False

    def restore_held(self, held_path: str) -> str | None:
        """Give a held input that no job holds (:func:`dropcut.paths.held_rel`) its name
        back, never over a file of that name (``name~2.ext``…); returns the name, or None
        when it is gone. Raises OSError when the move fails."""
        rel = PurePosixPath(held_path)
        try:
            dir_fd = open_dir_nofollow(self.layout.inbox, str(rel.parent))
        except FileNotFoundError:
            return None
        with _dir(dir_fd):
            if not _exists(rel.name, dir_fd):
                return None
            return _put_back(dir_fd, rel.name, held_original(held_path))

    def place_output(self, staged: Path, out_rel: str) -> None:
        place(staged, self.layout.outbox, out_rel)

    def dispose_input(
        self,
        rel_path: str,
        sha256: str,
        identity: tuple[int, int, int, int, int],
        *,
        held_as: str | None,
        hold: Callable[[str | None], None],
    ) -> str:
        """Archive, delete or keep an input after its output is durable, but only if what
        is on disk at that moment is the content (``sha256``) the output was made from.

        The input is first renamed to a private name in its own folder (``hold`` records
        that name before the rename, so a crash finds it again: pass it back as
        ``held_as``), then checked on an open descriptor: a save to the input's name from
        then on makes a new file, which is not touched. Content that is not ``sha256`` is
        put back under its name (or ``name~2.ext``… if a new file took it meanwhile),
        never archived or deleted. Returns ``kept``, ``deleted``, ``archived:<rel>``,
        ``gone`` or ``changed:<rel it was put back as>``. Raises OSError when a step fails
        (EACCES, EPERM, ENOSPC): nothing is lost, and calling again resumes."""
        if self.on_success == "keep":
            if held_as is not None:  # held by a run with another on_success, then a crash
                self.restore_held(held_as)
            return "kept"
        what = self._hold(rel_path, sha256, identity, held_as=held_as, hold=hold)
        if not what.startswith("held:"):
            return what
        held_as = what.removeprefix("held:")
        held = PurePosixPath(held_as)
        try:
            if self.on_success == "delete":
                with _dir(open_dir_nofollow(self.layout.inbox, str(held.parent))) as dir_fd:
                    os.unlink(held.name, dir_fd=dir_fd)
                    fsync_dir(dir_fd)
                return "deleted"
            moved = move_in(
                self.layout.inbox, held_as, self.layout.archive, numbered_candidates(rel_path), sha256=sha256
            )
        except OSError:
            # Not under a private name while it waits for the next try (EACCES, a full
            # archive): the user sees the file where it was.
            with contextlib.suppress(OSError):
                self.restore_held(held_as)
            raise
        return "gone" if moved is None else f"archived:{moved}"

    def _hold(
        self,
        rel_path: str,
        sha256: str,
        identity: tuple[int | None, ...],
        *,
        held_as: str | None = None,
        hold: Callable[[str | None], None] = lambda held_as: None,
    ) -> str:
        """Take the input out of the user's way before it is moved or deleted: renamed to a
        private name in its own folder (``hold`` is told the name first; ``held_as`` is
        one a crash left: resumed), then read and hashed on an open descriptor. Returns
        ``held:<private rel>`` when it is the content ``sha256``; else the file is left
        (another stat than ``identity``: ``changed:<rel>``; no file: ``gone``) or put back
        under its name, never over a file saved there meanwhile (``changed:<rel>``)."""
        rel = PurePosixPath(rel_path)
        try:
            dir_fd = open_dir_nofollow(self.layout.inbox, str(rel.parent))
        except FileNotFoundError:
            return "gone"  # (a held file in a folder renamed meanwhile: held_found restores it)
        with _dir(dir_fd):
            held = PurePosixPath(held_as).name if held_as is not None else None
            if held is None or not _exists(held, dir_fd):
                try:
                    st = os.stat(rel.name, dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    return "gone"
                signature = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
                if not stat.S_ISREG(st.st_mode) or signature != identity:
                    return f"changed:{rel_path}"  # other content (or a link, a folder): not ours
                held_as = held_rel(rel_path, secrets.token_hex(8))
                held = PurePosixPath(held_as).name
                hold(held_as)
                try:
                    os.rename(rel.name, held, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                except FileNotFoundError:
                    return "gone"
            if _sha256_at(held, dir_fd) != sha256:
                return f"changed:{_put_back(dir_fd, held, rel_path)}"
        return f"held:{held_as}"

    def quarantine_input(
        self,
        *,
        rel_path: str,
        sha256: str | None,
        size: int | None,
        identity: tuple[int | None, ...],
        error: dict[str, Any],
        attempts: int,
        first_seen: float,
        history: list[dict[str, Any]],
        spool: Path | None,
        q_rel: str | None = None,
        before_move: Callable[[str], None] | None = None,
    ) -> str | None:
        """Move the input (or, when it changed meanwhile, the spooled bytes that were
        refused) to ``quarantine/<rel>``, writing ``<rel>.error.json`` first. Returns the
        quarantine name, or None when there was nothing to quarantine.

        ``before_move`` is told the chosen name before anything moves, so the caller can
        record its intent; after a crash, calling again with that ``q_rel`` finishes the
        job without a second copy.
        """
        from_inbox = self.identity_matches(rel_path, identity)
        if q_rel is not None and not from_inbox and self._in_quarantine(q_rel):
            return q_rel  # moved before a crash
        if not from_inbox and (spool is None or not spool.exists()):
            return None
        if q_rel is None:
            q_rel = pick_free(self.layout.quarantine, numbered_candidates(rel_path))
        record = {
            "file": rel_path,
            "quarantined_as": q_rel,
            "sha256": sha256,
            "size_bytes": size,
            "error": error,
            "attempts": attempts,
            "first_seen": iso(first_seen),
            "failed_at": iso(self._clock()),
            "history": history,
        }
        write_json(self.layout.quarantine, error_json_rel(q_rel), record)
        if before_move is not None:
            before_move(q_rel)
        held_as: str | None = None
        if from_inbox and sha256:
            # Only now, with the quarantine folder shown writable, is the input taken out of
            # the user's way: the file at that name must be the refused content (a save in
            # between is never quarantined in its place: it goes back, the spooled bytes go).
            what = self._hold(rel_path, sha256, identity)
            from_inbox = what.startswith("held:")
            held_as = what.removeprefix("held:") if from_inbox else None
            if not from_inbox and (spool is None or not spool.exists()):
                return None
        try:
            if from_inbox:
                moved = move_in(
                    self.layout.inbox, held_as or rel_path, self.layout.quarantine, [q_rel], sha256=sha256
                )
                if moved is None:
                    return None
            else:
                assert spool is not None
                place(copy_to_staging(spool, self.layout.quarantine), self.layout.quarantine, q_rel)
        except OSError:
            if held_as is not None:  # where the user can see it while it waits for the next try
                with contextlib.suppress(OSError):
                    self.restore_held(held_as)
            raise
        return q_rel

    def _in_quarantine(self, q_rel: str) -> bool:
        rel = PurePosixPath(q_rel)
        try:
            fd = open_dir_nofollow(self.layout.quarantine, str(rel.parent))
        except OSError:
            return False
        with _dir(fd):
            return _exists(rel.name, fd)
