"""The one way cmc-fast opens a file it reads or appends to: images, checkpoints, bundles, run configs, ``.lock``,
``log.txt``, the token cache, manifests.

Every open is decided the same way, before a byte is read:

- ``os.stat`` first: only a regular file is opened (a named pipe, a device such as ``/dev/zero``, a socket or a
  directory is refused unopened, so it can neither hang the reader nor feed it without end);
- the open is non-blocking (``O_NONBLOCK``: a file swapped for a pipe after the stat cannot hang it) and the
  opened descriptor is checked again (``fstat``), so what is read is what was checked;
- a read is bounded: a file over its limit is refused by its size, and the rest is read in one call of at most
  ``limit + 1`` bytes (a file that grew since the stat is refused too);
- appends (``log.txt``) never follow a symlink (``O_NOFOLLOW``) and only ever extend a regular file;
- lines (manifests, predict's input) are read at most ``LINE_LIMIT`` bytes at a time (``bounded_lines``).

Writes the tool owns: ``make_temp`` names a temporary file ``.<target>.cmc-fast-<pid>.<random>.tmp`` (stray-file
cleanup removes only those, of dead writers); ``replacing_output`` writes a user-named output (``predict --out``)
beside it and renames it into place, refusing an output that is one of the command's inputs, a folder, or being
written by another cmc-fast process.

A refusal raises ``FileRefused`` (a ``ValueError``) whose message is one line starting with the file's path and
saying what is wrong; the CLI prints it and exits 2. Imports nothing from ``cmc_fast``.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
# limits of the small files the tool writes itself; a file far over them was not written by it
JSON_LIMIT = 16 * MIB  # a run's or bundle's config.json, metrics, a vocabulary list
LOCK_LIMIT = 4 * KIB
LINE_LIMIT = 16 * MIB  # one line of a manifest or a predict input: one post
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
_NOT_REGULAR = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))


class FileRefused(ValueError):
    """A file cmc-fast will not read or write; the message is one line naming the file and why."""


def kind_of(mode: int) -> str:
    return next((what for test, what in _NOT_REGULAR if test(mode)), "not a plain file")


def stat_problem(path: str | os.PathLike, st: os.stat_result, limit: int | None = None, limit_flag: str = "",
                 allow_empty: bool = False) -> str | None:
    """Why a file of this ``stat`` will not be read: not regular, empty, over ``limit`` bytes (None: fine)."""
    if not stat.S_ISREG(st.st_mode):
        return f"{os.fspath(path)}: not a regular file ({kind_of(st.st_mode)}); only regular files are read"
    if st.st_size == 0 and not allow_empty:
        return f"{os.fspath(path)}: empty file (0 bytes)"
    if limit is not None and st.st_size > limit:
        return size_problem(path, st.st_size, limit, limit_flag)
    return None


def size_problem(path: str | os.PathLike, size: int, limit: int, limit_flag: str = "") -> str:
    """The refusal of ``size`` bytes over a ``limit`` (set by ``limit_flag``), worded alike for files and bytes."""
    hint = f" ({limit_flag})" if limit_flag else ""
    return f"{os.fspath(path)}: {size} bytes, over the byte limit of {limit}{hint}"


def file_problem(path: str | os.PathLike, limit: int | None = None, limit_flag: str = "",
                 allow_empty: bool = False) -> str | None:
    """Why ``path`` will not be read (missing, not a regular file, empty, over ``limit``), from ``os.stat`` alone:
    nothing is opened."""
    try:
        st = os.stat(path)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        return cannot(path, exc)
    return stat_problem(path, st, limit, limit_flag, allow_empty)


def cannot(path: str | os.PathLike, exc: BaseException, verb: str = "read") -> str:
    reason = getattr(exc, "strerror", None) or str(exc)
    return f"{os.fspath(path)}: cannot {verb}: {type(exc).__name__}: {reason}"


def open_regular(path: str | os.PathLike, limit: int | None = None, limit_flag: str = "",
                 allow_empty: bool = False) -> io.BufferedReader:
    """``path`` opened for reading once it is known to be a regular file within ``limit`` bytes (checked before
    and after the non-blocking open); raises ``FileRefused``. The caller closes it (``with``)."""
    problem = file_problem(path, limit, limit_flag, allow_empty)
    if problem:
        raise FileRefused(problem)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise FileRefused(cannot(path, exc)) from None
    try:
        problem = stat_problem(path, os.fstat(fd), limit, limit_flag, allow_empty)
        if problem:
            raise FileRefused(problem)
        os.set_blocking(fd, True)  # a regular file: reads are plain reads from here on
        return open(fd, "rb", closefd=True)
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str | os.PathLike, limit: int, limit_flag: str = "", allow_empty: bool = False) -> bytearray:
    """The whole of a regular file of at most ``limit`` bytes, read in one bounded call into one buffer (no copy
    after the read); raises ``FileRefused``."""
    with open_regular(path, limit, limit_flag, allow_empty) as f:
        size = os.fstat(f.fileno()).st_size
        data = bytearray(min(size, limit) + 1)
        try:
            got = f.readinto(data)
        except OSError as exc:
            raise FileRefused(cannot(path, exc)) from None
    if got > limit:  # grew since the stat
        hint = f" ({limit_flag})" if limit_flag else ""
        raise FileRefused(f"{os.fspath(path)}: over the byte limit of {limit}{hint}")
    del data[got:]
    if not data and not allow_empty:
        raise FileRefused(f"{os.fspath(path)}: empty file (0 bytes)")
    return data


def read_text(path: str | os.PathLike, limit: int = JSON_LIMIT, allow_empty: bool = False) -> str:
    data = read_bytes(path, limit, allow_empty=allow_empty)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise FileRefused(f"{os.fspath(path)}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x})") from None


def parse_json(text: str, where: str) -> Any:
    """``json.loads`` whose every failure is one ``FileRefused`` line naming ``where``: invalid JSON (with its
    line), nesting too deep for the parser, an integer of more digits than Python converts."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FileRefused(f"{where}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    except RecursionError:
        raise FileRefused(f"{where}: invalid JSON: nested too deeply") from None
    except ValueError as exc:  # an integer over sys.get_int_max_str_digits()
        raise FileRefused(f"{where}: invalid JSON: {' '.join(str(exc).split())[:160]}") from None


def read_json(path: str | os.PathLike, limit: int = JSON_LIMIT) -> Any:
    """The JSON document in a regular file of at most ``limit`` bytes; raises ``FileRefused``."""
    return parse_json(read_text(path, limit), os.fspath(path))


def bounded_lines(stream: io.BufferedReader, limit: int = LINE_LIMIT) -> Iterator[tuple[int, bytes | None]]:
    """(line number, the line) for each line of at most ``limit`` bytes; a longer one is skipped through
    unread in bounded pieces and given as None (so one huge line costs no more memory than a short one)."""
    number = 0
    while True:
        raw = stream.readline(limit + 1)
        if not raw:
            return
        number += 1
        if len(raw) <= limit or raw.endswith(b"\n"):
            yield number, raw
            continue
        while raw and not raw.endswith(b"\n"):
            raw = stream.readline(limit)
        yield number, None


def open_append(path: str | os.PathLike) -> io.TextIOWrapper:
    """``path`` opened to append text (created when missing), never through a symbolic link and only when it is
    a regular file; raises ``FileRefused``."""
    flags = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
             | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise FileRefused(cannot(path, exc, "write")) from None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise FileRefused(f"{os.fspath(path)}: is a symbolic link; not written through")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise FileRefused(f"{os.fspath(path)}: not a regular file ({kind_of(st.st_mode)}); not written")
    try:  # O_NOFOLLOW and the fstat below hold if the path is swapped after the lstat
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        raise FileRefused(cannot(path, exc, "write")) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileRefused(f"{os.fspath(path)}: not a regular file ({kind_of(st.st_mode)}); not written")
        os.set_blocking(fd, True)
        return open(fd, "a", encoding="utf-8", closefd=True)
    except BaseException:
        os.close(fd)
        raise


# ---------------------------------------------------------------------------------------------------------- writing
# A temporary file the tool writes is named ``.<target>.cmc-fast-<pid>.<random>.tmp``: the prefix says it is the
# tool's and the PID which process owns it, so stray-file cleanup removes only those whose owner is gone, never a
# user's own ``*.tmp``.
_TEMP_MARK = "cmc-fast"
OWNED_TEMP = re.compile(rf"^\..+\.{_TEMP_MARK}-(\d{{1,10}})\.[A-Za-z0-9_]+\.tmp$")


def make_temp(folder: str | os.PathLike, target_name: str) -> tuple[int, str]:
    """(fd, path) of a new temporary file in ``folder`` for ``target_name``, named as the tool's own."""
    return tempfile.mkstemp(dir=folder, prefix=f".{target_name}.{_TEMP_MARK}-{os.getpid()}.", suffix=".tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """``write(f)`` into a temporary file beside ``path`` (named as the tool's own), synced, given the mode the
    umask sets (mkstemp makes it 0600: a run folder is read by teammates too), then renamed over ``path``: a
    reader sees the old file or the whole new one, and a killed write leaves only a temporary cleanup removes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = make_temp(path.parent, path.name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def owned_temp_pid(name: str) -> int | None:
    """The PID that wrote this temporary file, when its name marks it as the tool's own (else None)."""
    found = OWNED_TEMP.match(name)
    return int(found.group(1)) if found else None


def pid_alive(pid: int) -> bool:
    """Whether a process of that PID runs here; a PID no system can have (<= 0, > 2^22) is not alive."""
    if not 0 < pid <= 1 << 22:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """``a`` and ``b`` are one file (through links, ``..`` or hard links); False when either is missing."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


@contextlib.contextmanager
def replacing_output(path: str | os.PathLike, flag: str, inputs: tuple[str | os.PathLike, ...] = ()
                     ) -> Iterator[io.TextIOWrapper]:
    """A text file to write ``path``'s new content into: refused when ``path`` is a folder, under something that is
    not a folder, one of ``inputs``, or being written by another cmc-fast process (an advisory ``flock`` on
    ``.<name>.cmc-fast.lock`` beside it, released by the kernel when its holder dies). The content goes to a
    temporary file, renamed over ``path`` when the body ends without an exception (a symlink at ``path`` is
    replaced, never written through); otherwise ``path`` is left as it was."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise FileRefused(f"{flag} {path}: is a folder; name a file")
    if not os.path.isdir(folder):
        raise FileRefused(f"{flag} {path}: {folder} is not a folder")
    for source in inputs:
        if same_file(path, source):
            raise FileRefused(f"{flag} {path}: is {os.fspath(source)}, which this command reads; name another "
                              "file (it was not changed)")
    name = os.path.basename(path)
    with _output_lock(os.path.join(folder, f".{name}.{_TEMP_MARK}.lock"), flag, path):
        try:
            fd, tmp = make_temp(folder, name)
        except OSError as exc:
            raise FileRefused(cannot(path, exc, "write")) from None
        try:
            with open(fd, "w", encoding="utf-8", closefd=True) as out:
                yield out
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it back at once
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _output_lock(lock_path: str, flag: str, path: str) -> Iterator[None]:
    for _ in range(5):
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError as exc:
            raise FileRefused(cannot(lock_path, exc, "create the lock file")) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise FileRefused(f"{flag} {path}: being written by another cmc-fast process (lock {lock_path}); "
                              "wait for it or name another file") from None
        try:  # the lock file we locked is still the one at lock_path (a finishing holder unlinks it)
            if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    else:
        raise FileRefused(f"{flag} {path}: could not take the lock {lock_path}; retry")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)
