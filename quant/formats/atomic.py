"""Atomic output: a folder or file is either the complete old one or the complete new one, whatever kills the
writer (an exception, Ctrl-C, SIGKILL), and what a killed writer left behind is tidied by the next write.

Every writer (checkpoints, GPTQ export, Hub staging, ``moe align``, the CLI's JSON files) goes through
:func:`atomic_dir` or :func:`atomic_file`.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import sys
from contextlib import contextmanager, suppress
from pathlib import Path

from quant.errors import QuantError

_AT_FDCWD = -100  # renameat2's "relative to the working directory"
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one atomic step (Linux ``renameat2(..., RENAME_EXCHANGE)``).

    False where the OS, its C library or the filesystem cannot; the caller then falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no renameat2 in this libc (glibc < 2.28, musl < 1.2.2)
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # old kernel, or a filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _alive(pid: int) -> bool:
    """Whether process ``pid`` may still be running; True whenever that cannot be told."""
    if os.name != "posix" or pid == os.getpid():  # Windows' os.kill(pid, 0) would terminate the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: someone else's process
        return True
    return True


def _leftover_re(out: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)-[0-9a-f]{{8}}")


def _sibling(out: Path, kind: str, tag: str | None = None) -> Path:
    """``.{name}.{kind}-{pid}-{8 hex}`` next to ``out``: the pid tells later writers whether its owner still runs."""
    return out.with_name(f".{out.name}.{kind}-{os.getpid()}-{tag or secrets.token_hex(4)}")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with suppress(OSError):
            p.unlink()


def _mtime(p: Path) -> float:
    try:
        return p.lstat().st_mtime
    except OSError:
        return 0.0


def recover_output(out: str | Path) -> None:
    """Tidy what killed writers left next to ``out``: the ``.{name}.tmp-{pid}-*`` and ``.{name}.old-{pid}-*``
    siblings of writers whose process no longer exists are removed; if ``out`` itself is missing because a
    writer died between the two renames of the fallback swap, its ``.old-`` folder is first renamed back to
    ``out``. Leftovers of a live process (another writer at work) are never touched."""
    out = Path(out).absolute()
    pattern = _leftover_re(out)
    try:
        entries = list(out.parent.iterdir())
    except OSError:  # no parent folder yet: nothing to tidy
        return
    dead = []
    for p in entries:
        m = pattern.fullmatch(p.name)
        if m and not _alive(int(m[2])):
            dead.append((m[1], p))
    olds = sorted((p for kind, p in dead if kind == "old"), key=_mtime, reverse=True)
    restored = None
    if olds and not os.path.lexists(out):
        with suppress(OSError):
            os.rename(olds[0], out)
            restored = olds[0]
    for kind, p in dead:
        if p == restored or (kind == "old" and not os.path.lexists(out)):
            continue  # never delete the only copy of the previous output
        _remove(p)


def _swap_in(tmp: Path, out: Path) -> None:
    if not os.path.lexists(out):
        os.rename(tmp, out)
    elif _exchange(tmp, out):  # one atomic step: ``out`` is the old folder, then the new one, never missing
        _remove(tmp)  # now the old folder
    else:  # two renames; a kill between them is repaired by the next writer (recover_output)
        old = _sibling(out, "old", tmp.name[-8:])
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        _remove(old)


@contextmanager
def atomic_dir(out: Path):
    """Yield a temporary sibling of ``out`` to write into; on success it is renamed into place, on any error
    removed, so ``out`` is always either the complete old folder or the complete new one.

    The temporary folder is ``.{name}.tmp-{pid}-{8 hex}``. An existing ``out`` is replaced only once the new
    folder is complete, by an atomic exchange of the two (Linux ``renameat2``); where that is unavailable,
    by two renames through ``.{name}.old-{pid}-{8 hex}``. A writer killed outright (SIGKILL, power cut of the
    process) cannot clean up: the next ``atomic_dir`` or :func:`check_output_dir` on the same ``out`` removes
    the siblings of writers whose pid no longer runs, and restores ``out`` from its ``.old-`` folder if the
    kill fell between the two renames (:func:`recover_output`). An existing ``out`` that is not a folder is
    refused."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_output(out)
    if os.path.lexists(out) and not out.is_dir():
        raise QuantError(f"output path {out} exists and is not a folder")
    while True:
        tmp = _sibling(out, "tmp")
        try:
            tmp.mkdir()  # the default mode (umask applies), as a folder written in place would get
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        _swap_in(tmp, out)
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def atomic_file(path: str | Path):
    """Yield a text file to write; on success it replaces ``path`` in one rename, on any error it is removed.

    The temporary file is ``.{name}.tmp-{pid}-{8 hex}``, flushed to disk before the rename; leftovers of
    killed writers are removed by the next write (:func:`recover_output`)."""
    path = Path(path).absolute()
    recover_output(path)
    while True:
        tmp = _sibling(path, "tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "w") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise
