"""``dropcut run`` with the changes that bench/README.md recommends for files outside
``bench/`` applied as monkeypatches, so that their effect can be measured before they are
made (``--recommended`` on a benchmark). Each patch is a no-op once its change is in.

1. watch.py: watchdog holds an IN_MOVED_FROM event back for 0.5 s to pair it with its
   IN_MOVED_TO; when its emitter thread looks at the queue between the two, it sleeps the
   whole 0.5 s even though the pair completes microseconds later, so a rename into the
   inbox often reaches dropcut half a second late. dropcut does not need the pairs (a
   move reports its destination; an unpaired one arrives as "created"): 50 ms is plenty.
2. watch.py: schedule the watch with an ``event_filter``, so inotify's mask leaves out
   IN_OPEN, IN_CLOSE_NOWRITE and IN_DELETE. Without it every open of a file or folder
   in the inbox — dropcut's own settle and inspect reads, several per file — is an event
   that watchdog parses in Python (about half a core while a backlog is admitted) and
   the handler then ignores.
3. watch.py, polling only: watchdog's PollingObserver stats every file of the tree and
   diffs two full snapshots in Python at every poll (about 0.2 s of CPU per poll for
   10,000 files). :class:`FolderPollObserver` stats only the folders and lists again only
   those whose mtime changed (a file created, renamed in or removed changes its folder's
   mtime); what it misses — a file rewritten in place in a folder that did not change —
   the periodic full rescan still finds. A sketch of the idea, to measure it.
"""

from __future__ import annotations

import os
import sys

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
)
from watchdog.observers.api import BaseObserver, EventEmitter, EventQueue, ObservedWatch

EVENT_FILTER: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileAttribEvent,
    FileMovedEvent,
    FileClosedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirModifiedEvent,
]


class FolderPollEmitter(EventEmitter):
    """Polls folder mtimes; reports the entries of changed folders as created/modified."""

    def __init__(
        self,
        event_queue: EventQueue,
        watch: ObservedWatch,
        *,
        timeout: float = 1.0,
        event_filter: list[type[FileSystemEvent]] | None = None,
    ) -> None:
        super().__init__(event_queue, watch, timeout=timeout, event_filter=event_filter)
        # folder -> (its mtime_ns, {name: (size, mtime_ns, is_dir)})
        self._folders: dict[str, tuple[int, dict[str, tuple[int, int, bool]]]] = {}

    def on_thread_start(self) -> None:
        self._list(os.fsdecode(self.watch.path), report=False)

    def _list(self, folder: str, *, report: bool) -> None:
        try:
            mtime = os.stat(folder).st_mtime_ns
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            self._folders.pop(folder, None)
            return
        old = self._folders.get(folder, (0, {}))[1]
        new: dict[str, tuple[int, int, bool]] = {}
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            is_dir = entry.is_dir(follow_symlinks=False)
            new[entry.name] = (st.st_size, st.st_mtime_ns, is_dir)
            if is_dir and entry.path not in self._folders:
                if report:
                    self.queue_event(DirCreatedEvent(entry.path))
                self._list(entry.path, report=report)
            elif report and not is_dir:
                before = old.get(entry.name)
                if before is None:
                    self.queue_event(FileCreatedEvent(entry.path))
                elif before != new[entry.name]:
                    self.queue_event(FileModifiedEvent(entry.path))
        self._folders[folder] = (mtime, new)

    def queue_events(self, timeout: float) -> None:
        if self.stopped_event.wait(timeout):
            return
        root = os.fsdecode(self.watch.path)
        if not os.path.isdir(root):
            self.queue_event(DirDeletedEvent(root))
            self.stop()
            return
        for folder, (mtime, _) in list(self._folders.items()):
            try:
                now = os.stat(folder).st_mtime_ns
            except OSError:
                self._folders.pop(folder, None)
                continue
            if now != mtime:
                self._list(folder, report=True)


class FolderPollObserver(BaseObserver):
    def __init__(self, timeout: float) -> None:
        super().__init__(FolderPollEmitter, timeout=timeout)


def apply() -> list[str]:
    applied = []
    try:
        from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper
    except ImportError:
        pass
    else:
        InotifyMoveEventGrouper.delay = 0.05
        applied.append("move-pairing delay 0.05 s")

    from dropcut import watch

    def start(self: watch.InboxWatcher) -> None:
        if self.mode == "poll" and self._factory is watch.default_observer:
            observer: BaseObserver = FolderPollObserver(timeout=self._poll_interval)
        else:
            observer = self._factory(self.mode, self._poll_interval)
        observer.daemon = True
        observer.schedule(
            watch._Handler(self.inbox, self._report),
            os.fsdecode(self.inbox),
            recursive=True,
            event_filter=EVENT_FILTER,
        )
        observer.start()
        self._observer = observer

    watch.InboxWatcher.start = start  # type: ignore[method-assign]
    applied.append("inotify event filter, folder-mtime polling")
    return applied


def main() -> int:
    apply()
    from dropcut.cli import main as cli_main

    return cli_main(["run", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
