"""A run folder is claimed before anything is written into it.

``claim(run_dir, flag=...)`` (a context manager) makes sure the folder can be ours and holds it while the run
writes:

- the path is a folder we can write to (created when missing); an existing file or a read-only folder is refused;
- an existing folder that is neither empty nor a cmc-fast run (``is_run``: a ``config.json`` of ``Config``
  fields) is refused: nothing of the user's is overwritten;
- ``.lock`` holds ``{"pid", "host", "started"}`` while the run writes. A second run on the folder is refused with
  one line naming the holder's PID and host; a lock left by a dead process on this host is taken over (and
  said so); a lock from another host is never presumed dead;
- once held, the temporary files a killed write of the tool left (named as its own by ``safe_io.make_temp``, their
  writer gone) are removed; nothing else is.

The lock file appears atomically with its content (written beside it, then hard-linked into place), so a reader
never sees it half-written.

``log_to(run_dir)`` (a context manager) is the one writer of the folder's ``log.txt``: the toolkit's logger
(``cmc_fast``) appends every record there through one handler while it is held, the CLI's notes and error line
among them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from cmc_fast.data_pipeline import safe_io
from cmc_fast.errors import UsageError

LOCK_NAME = ".lock"
LOG_NAME = "log.txt"
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
log = logging.getLogger("cmc_fast")
MAX_PID = 1 << 22  # Linux's pid_max ceiling: a lock naming a larger PID was not written by a process


def _read_lock(path: Path) -> dict | None:
    """The lock's holder; {} when the lock is not a small regular file of JSON (``safe_io``: a pipe or a link to
    /dev/zero is refused unread), None when there is no lock."""
    if not os.path.lexists(path):
        return None
    try:
        holder = safe_io.read_json(path, safe_io.LOCK_LIMIT)
    except safe_io.FileRefused:
        return None if not os.path.lexists(path) else {}
    return holder if isinstance(holder, dict) else {}


def is_run(run_dir: Path) -> bool:
    """``run_dir`` holds a cmc-fast run: its ``config.json`` is a JSON object of ``Config`` fields (a user's own
    ``config.json`` of other keys does not make a folder ours to overwrite)."""
    from cmc_fast.config import Config

    try:
        data = safe_io.read_json(run_dir / "config.json")
    except safe_io.FileRefused:
        return False
    fields = {f.name for f in dataclasses.fields(Config)}
    return isinstance(data, dict) and "dataset" in data and set(data) <= fields


def _check_folder(run_dir: Path, flag: str, allow_foreign: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"{flag} {run_dir}: exists and is not a folder; choose a new or empty folder")
    foreign = run_dir.is_dir() and not allow_foreign and not is_run(run_dir)
    if foreign and any(p.name != LOCK_NAME for p in run_dir.iterdir()):
        raise UsageError(f"{flag} {run_dir}: folder is not empty and is not a cmc-fast run; choose a new or empty "
                         "folder (nothing in it was changed)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{flag} {run_dir}: cannot create the folder ({exc.strerror or exc})") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {run_dir}: folder is not writable")


def _try_lock(lock: Path, me: dict) -> bool:
    """Create ``lock`` holding ``me``, atomically; False when it already exists."""
    fd, name = safe_io.make_temp(lock.parent, LOCK_NAME)  # a new file (O_EXCL): never written through a link
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(me))
        os.link(tmp, lock)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _take_over_stale(lock: Path, holder: dict, flag: str, run_dir: Path) -> str:
    """Move a dead holder's lock aside (only one taker wins the rename); returns the note to report."""
    aside = lock.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return ""  # another taker moved it first: the retry sees its lock
    moved = _read_lock(aside)
    if moved != holder:  # a live lock replaced the stale one in between: put it back, refuse
        with contextlib.suppress(OSError):
            os.link(aside, lock)
        aside.unlink(missing_ok=True)
        raise UsageError(f"{flag} {run_dir}: another run claimed the folder just now; choose another folder")
    aside.unlink(missing_ok=True)
    return (f"{run_dir}: took over the lock of PID {holder.get('pid')} on {holder.get('host')}, which is no longer "
            "running")


def _in_use(holder: dict, lock: Path, flag: str, run_dir: Path) -> str:
    return (f"{flag} {run_dir}: in use by PID {holder.get('pid')} on {holder.get('host')} since "
            f"{holder.get('started', '?')} (lock {lock}); wait for it or choose another folder")


def _acquire(run_dir: Path, flag: str) -> tuple[Path, dict, str]:
    lock = run_dir / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    note = ""
    for _ in range(3):
        try:
            if _try_lock(lock, me):
                return lock, me, note
        except OSError as exc:
            raise UsageError(f"{flag} {run_dir}: cannot write the lock file ({exc.strerror or exc})") from None
        holder = _read_lock(lock)
        if holder is None:
            continue  # released between our attempt and the read
        pid, host = holder.get("pid"), holder.get("host")
        if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid <= MAX_PID or not isinstance(host, str):
            raise UsageError(f"{flag} {run_dir}: lock file {lock} is unreadable; delete it if no run uses the folder")
        if host != me["host"] or safe_io.pid_alive(pid):
            raise UsageError(_in_use(holder, lock, flag, run_dir))
        note = _take_over_stale(lock, holder, flag, run_dir) or note
    raise UsageError(f"{flag} {run_dir}: could not claim the lock {lock}; retry")


def remove_stray_temporaries(run_dir: Path) -> list[Path]:
    """The temporary files a killed atomic write left in the run folder and its checkpoints: only files named as
    the tool's own (``safe_io.make_temp``) whose writing process is gone, never a user's ``*.tmp``, never a link,
    and never inside a ``checkpoints`` that is a link to a folder elsewhere."""
    removed = []
    for folder in (run_dir, run_dir / "checkpoints"):
        if folder.is_symlink() or not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            pid = safe_io.owned_temp_pid(entry.name)
            if pid is None or not entry.is_file(follow_symlinks=False) or safe_io.pid_alive(pid):
                continue
            Path(entry.path).unlink(missing_ok=True)
            removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def claim(run_dir: str | Path, *, flag: str = "--out", allow_foreign: bool = False) -> Iterator[list[str]]:
    """Hold ``run_dir`` for the body; yields the notes to report (a stale lock taken over, temporaries removed).
    ``allow_foreign``: skip the not-a-run check (the caller has checked the folder is a run)."""
    run_dir = Path(run_dir)
    _check_folder(run_dir, flag, allow_foreign)
    lock, me, note = _acquire(run_dir, flag)
    try:
        notes = [note] if note else []
        removed = remove_stray_temporaries(run_dir)
        if removed:
            notes.append(f"{run_dir}: removed {len(removed)} temporary file(s) left by a killed write: "
                         + ", ".join(p.name for p in removed[:5]))
        yield notes
    finally:
        if _read_lock(lock) == me:
            lock.unlink(missing_ok=True)


def refuse_existing_run(run_dir: Path, *, overwrite: bool, held: bool = False) -> None:
    """A new run never lands on top of another: an ``--out`` holding a cmc-fast run is refused, naming it and the
    ways on (resume it, another ``--out``, ``--overwrite``), unless ``overwrite`` was asked for. A run writing
    there now is named first (``held``: the caller holds the folder's lock itself)."""
    lock = run_dir / LOCK_NAME
    holder = None if held else _read_lock(lock)
    if holder and isinstance(holder.get("pid"), int) and (holder.get("host") != socket.gethostname()
                                                          or safe_io.pid_alive(holder["pid"])):
        raise UsageError(_in_use(holder, lock, "--out", run_dir))  # a run writing there now: say that first
    if overwrite or not is_run(run_dir):
        return
    if (run_dir / "metrics.json").is_file():
        raise UsageError(f"--out {run_dir}: holds a finished run (config.json, metrics.json, checkpoints/); nothing "
                         "was changed. Choose a new --out, or add --overwrite to delete everything in it and train "
                         f"anew (`cmc-fast train --resume {run_dir}` continues only a run that stopped)")
    raise UsageError(f"--out {run_dir}: holds a run that stopped before its end (config.json, checkpoints/); nothing "
                     f"was changed. Continue it with `cmc-fast train --resume {run_dir}`, choose a new --out, or add "
                     "--overwrite to delete everything in it and train anew")


def clear_run(run_dir: Path) -> list[str]:
    """Everything in the held ``run_dir`` but its lock deleted (``--overwrite``); a symlink is removed, never
    followed. Returns the note to report."""
    import shutil

    removed = 0
    for path in run_dir.iterdir():
        if path.name == LOCK_NAME:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed += 1
    return [f"--overwrite: deleted the {removed} entries of the run in {run_dir}"] if removed else []


class RunLogHandler(logging.FileHandler):
    """A run's ``log.txt``, appended through ``safe_io.open_append``: never through a symbolic link, never a
    pipe or device (refused with one line naming it)."""

    def __init__(self, path: Path):
        super().__init__(path, encoding="utf-8")
        self.setFormatter(logging.Formatter(LOG_FORMAT))

    def _open(self):
        return safe_io.open_append(self.baseFilename)


def run_log_handler(run_dir: str | Path) -> RunLogHandler | None:
    """The handler writing ``run_dir``'s log.txt, when one is attached to the toolkit's logger."""
    path = os.path.abspath(Path(run_dir) / LOG_NAME)
    return next((h for h in log.handlers if isinstance(h, RunLogHandler) and h.baseFilename == path), None)


@contextlib.contextmanager
def log_to(run_dir: str | Path) -> Iterator[RunLogHandler]:
    """The toolkit's log records appended to ``run_dir``'s log.txt for the body (INFO and up). Entered again for
    the same folder, it reuses the handler already there: one writer of the file at any time."""
    handler = run_log_handler(run_dir)
    if handler is not None:
        yield handler
        return
    handler = RunLogHandler(Path(run_dir) / LOG_NAME)
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        handler.close()
