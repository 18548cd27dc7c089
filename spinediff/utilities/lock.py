"""One run per output folder: an exclusive lock file ``.spinediff.lock`` taken before any work.

The lock is a kernel lock (``fcntl.flock``) on a file that names its holder (PID, host, command, start time). The
kernel drops the lock when its process ends, however it ends (``kill -9`` included), so a lock file left behind is
recognised as stale, reported and taken over; a live holder makes a second process stop at once with a
:class:`~spinediff.errors.SpineDiffError` (CLI exit 2) naming the other PID. The file is removed when the holder
releases it (the context manager's exit, or ``atexit``).

Commands that write into a folder take the lock *before* they check what the folder holds, so the check and the
writing that follows cannot interleave with another run's.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from spinediff.errors import SpineDiffError
from spinediff.io import LOCK_NAME

PART_LOCK_PREFIX = ".spinediff.part"  # `predict --num-parts N --part-id I` runs share a folder, one lock per part

_held: dict[Path, FolderLock] = {}  # lock files this process holds (re-entrant per path)


def _describe(holder: dict) -> str:
    parts = [f"PID {holder.get('pid', '?')}"]
    if holder.get("host") and holder.get("host") != socket.gethostname():
        parts.append(f"on {holder['host']}")
    if holder.get("command"):
        parts.append(f"`{holder['command']}`")
    if holder.get("started"):
        parts.append(f"started {holder['started']}")
    return ", ".join(parts)


def _read_holder(path: Path) -> dict:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text() or "{}")
        if isinstance(data, dict):
            return data
    return {}


def _holder_of_live_lock(path: Path, seconds: float = 1.0) -> dict:
    """The record of a lock another process holds. It writes its record just after taking the lock, so a reader that
    comes in between finds the file empty (or the stale record it replaces): wait briefly for the holder's own."""
    import time

    deadline = time.monotonic() + seconds
    while True:
        holder = _read_holder(path)
        if (holder.get("pid") is not None and not _stale_record(holder)) or time.monotonic() > deadline:
            return holder
        time.sleep(0.02)


def _stale_record(holder: dict) -> bool:
    """A record whose process no longer runs on this host (a lock file left by a killed run)."""
    return holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid"))


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderLock:
    """An exclusive lock on ``folder / name``; use :func:`folder_lock` (a context manager)."""

    def __init__(self, folder: Path, name: str, command: str) -> None:
        self.folder, self.path, self.command = folder, folder / name, command
        self.fd: int | None = None
        self.count = 0
        self.stale: dict | None = None  # the holder of a stale lock that was taken over

    def acquire(self) -> None:
        for _attempt in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as error:
                raise SpineDiffError(f"Cannot create the lock file {self.path} ({error.strerror}). Choose an output "
                                     "folder you can write to.") from error
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(fd)
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise SpineDiffError(f"Cannot lock {self.path} ({error.strerror}).") from error
                holder = _holder_of_live_lock(self.path)
                raise SpineDiffError(
                    f"{self.folder} is in use by another spinediff run ({_describe(holder)}; lock file {self.path}). "
                    "Wait for it to finish, or choose another output folder; two runs into one folder would "
                    "overwrite each other's files.") from None
            # the file may have been removed (released) between open and flock: only the file at the path counts
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = _read_holder(self.path)
            if previous:
                self.stale = previous
                alive = previous.get("host") == socket.gethostname() and _pid_alive(previous.get("pid"))
                state = "no longer holds it" if alive else "is no longer running"
                print(f"spinediff: taking over a stale lock {self.path} left by {_describe(previous)} ({state}); "
                      "that run was interrupted, its outputs may be incomplete.", file=sys.stderr)
            record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                      "started": datetime.datetime.now().isoformat(timespec="seconds")}
            try:
                os.ftruncate(fd, 0)
                os.write(fd, (json.dumps(record) + "\n").encode())
            except OSError as error:  # e.g. a full disk: the lock cannot say who holds it
                with contextlib.suppress(OSError):
                    self.path.unlink()
                os.close(fd)
                raise SpineDiffError(f"Cannot write the lock file {self.path} ({error.strerror}); free space on the "
                                     f"device holding {self.folder} or choose another output folder.") from error
            self.fd = fd
            return
        raise SpineDiffError(f"Could not take the lock {self.path}: it keeps being replaced by other processes.")

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still locked: a waiting process then sees a new file
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = None


def _command() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300] if sys.argv else "python"


def other_holders(folder: str | os.PathLike, prefix: str) -> list[dict]:
    """The live holders of lock files in ``folder`` whose names start with ``prefix`` (not this process's)."""
    found = []
    for path in sorted(Path(folder).glob(f"{prefix}*")):
        if path.resolve() in _held:
            continue
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError:
                found.append(_read_holder(path) | {"lock": str(path)})
            finally:
                os.close(fd)
    return found


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, *, name: str = LOCK_NAME, command: str | None = None,
                create: bool = True) -> Iterator[FolderLock]:
    """Hold an exclusive lock on ``folder`` while the block runs (the folder is created if needed; a folder
    this call created is removed again if the block fails and leaves it empty).

    Raises:
        SpineDiffError: another live process holds the lock (the message names its PID and command).
    """
    folder = Path(folder)
    created = not folder.exists()
    made = [folder, *(p for p in folder.parents if not p.exists())]  # the folders this call creates, deepest first
    if created:
        if not create:
            raise SpineDiffError(f"{folder} does not exist.")
        try:
            folder.mkdir(parents=True)
        except FileExistsError:
            if not folder.is_dir():
                raise SpineDiffError(f"{folder} exists and is not a folder. Choose another output folder.") from None
            created = False  # another process made it between the check and mkdir: the lock below decides
            made = []
        except OSError as error:
            raise SpineDiffError(f"Cannot create the output folder {folder} ({error.strerror}). Choose a folder you "
                                 "can write to.") from error
    key = (folder / name).resolve()
    lock = _held.get(key)
    if lock is None:
        lock = FolderLock(folder, name, command or _command())
        try:
            lock.acquire()
        except BaseException:
            if created:
                _remove_empty(made)
            raise
        _held[key] = lock
    lock.count += 1
    try:
        yield lock
    except BaseException:
        if created and lock.count == 1:
            _release(key)
            _remove_empty(made)  # only folders left empty: nothing was written into them
        raise
    finally:
        lock.count -= 1
        if lock.count <= 0:
            _release(key)


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _release(key: Path) -> None:
    lock = _held.pop(key, None)
    if lock is not None:
        lock.release()


@atexit.register
def _release_all() -> None:
    for key in list(_held):
        _release(key)
