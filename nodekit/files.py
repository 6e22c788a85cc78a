"""Files for nodes: atomic writes, an idempotent put, and reads that ride out transient errors.

Guarantee: writes are **atomic** (readers and a crash at any point see the old or the new
content, never a partial file) and `put` is **idempotent** (the same content twice writes
once).

A write goes to a temporary file in the target's directory, is flushed and fsynced, renamed
over the target with `os.replace` (atomic on POSIX and Windows), and the directory is fsynced
so that the rename itself survives a power loss. The target's permission bits are kept when
it exists (else the process umask applies, as for `open`), a symlink's target is replaced
rather than the link, and the temporary file is removed when anything fails before the
rename. The async twins write with aiofiles and run fsync, chmod and rename off the event
loop with `asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import stat
from typing import Any

from ._context import current_or_none
from ._events import emit
from ._runtime import RUNTIME

__all__ = [
    "aput",
    "aread_bytes",
    "aread_text",
    "awrite_atomic",
    "put",
    "read_bytes",
    "read_text",
    "write_atomic",
]

StrPath = str | os.PathLike[str]

# errno values after which reading again may well succeed (EINTR is retried by Python itself
# since PEP 475, but some C extensions and network file systems still surface it).
_TRANSIENT = frozenset(
    code
    for code in (
        errno.EAGAIN,
        errno.EWOULDBLOCK,
        errno.EINTR,
        errno.EBUSY,
        getattr(errno, "ESTALE", None),
    )
    if code is not None
)
_O_BINARY = getattr(os, "O_BINARY", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _aiofiles() -> Any:
    try:
        import aiofiles
    except ImportError as exc:
        raise ImportError(
            "nodekit.files' async functions need aiofiles: pip install 'nodekit[files]'",
            name=exc.name,
        ) from exc
    return aiofiles


# ---------------------------------------------------------------------------- decisions


def _names(path: StrPath, mode: int | None) -> tuple[str, str, str, int | None]:
    """The real target, its directory, a fresh temporary name beside it, and the mode to set.

    The mode is `mode`, else the existing target's permission bits, else None (the umask).
    """
    target = os.path.realpath(os.fspath(path))
    directory, name = os.path.split(target)
    temp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
    if mode is None:
        with contextlib.suppress(FileNotFoundError):
            mode = stat.S_IMODE(os.stat(target).st_mode)
    return target, directory, temp, mode


def _encode(data: bytes | str, encoding: str) -> bytes:
    if isinstance(data, str):
        return data.encode(encoding)
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    raise TypeError(f"data must be bytes or str, got {type(data).__name__}")


def _holds(path: StrPath, payload: bytes) -> tuple[str, bool]:
    """The real target, and whether it is a regular file holding exactly `payload`."""
    target = os.path.realpath(os.fspath(path))
    try:
        info = os.stat(target)
    except FileNotFoundError:
        return target, False
    if not stat.S_ISREG(info.st_mode) or info.st_size != len(payload):
        return target, False
    with open(target, "rb") as handle:
        return target, handle.read() == payload


def _backoff(attempt: int) -> float:
    return 0.01 * 2.0 ** (attempt - 1)


def _report(target: str, written: bool, size: int) -> None:
    ctx = current_or_none()
    emit(
        "files.put",
        ctx.node if ctx is not None else None,
        ctx.run_id if ctx is not None else None,
        ctx.attempt if ctx is not None else 0,
        path=target,
        written=written,
        bytes=size,
    )


# ---------------------------------------------------------------------------- I/O steps


def _write_all(fd: int, payload: bytes) -> None:
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(directory: str) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened."""
    flags = getattr(os, "O_DIRECTORY", None)
    if flags is None:  # pragma: no cover - Windows
        return
    fd = os.open(directory, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(temp: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(temp)


# ---------------------------------------------------------------------------- sync


def write_atomic(
    path: StrPath, data: bytes | str, *, mode: int | None = None, encoding: str = "utf-8"
) -> None:
    """Replace the file at `path` with `data` atomically (old or new content, never partial).

    `mode` sets the permission bits; by default an existing file's are kept. A `str` is
    encoded with `encoding`. Errors (`OSError`) propagate after the temporary file is removed;
    a failure of the final directory fsync leaves the new content in place.
    """
    payload = _encode(data, encoding)
    target, directory, temp, keep = _names(path, mode)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY | _O_CLOEXEC, 0o666)
    try:
        try:
            if keep is not None:
                os.chmod(temp, keep)
            _write_all(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, target)
    except BaseException:
        _discard(temp)
        raise
    _fsync_dir(directory)


def put(
    path: StrPath, data: bytes | str, *, mode: int | None = None, encoding: str = "utf-8"
) -> bool:
    """Write `data` atomically unless the file already holds exactly it; True if written.

    Idempotent: running the same put again (a retry, a resumed flow) changes nothing and
    returns False. Reported as a ``files.put`` event with ``written``.
    """
    payload = _encode(data, encoding)
    target, same = _holds(path, payload)
    if same:
        _report(target, False, len(payload))
        return False
    write_atomic(target, payload, mode=mode)
    _report(target, True, len(payload))
    return True


def read_bytes(path: StrPath, *, attempts: int = 3) -> bytes:
    """The file's content, read again (with a short backoff) after a transient `OSError`.

    Transient: EAGAIN, EINTR, EBUSY, ESTALE. Other errors, and the last attempt's, propagate.
    """
    attempt = 1
    while True:
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except OSError as exc:
            if exc.errno not in _TRANSIENT or attempt >= attempts:
                raise
        RUNTIME.sleep(_backoff(attempt))
        attempt += 1


def read_text(path: StrPath, *, encoding: str = "utf-8", attempts: int = 3) -> str:
    """`read_bytes`, decoded with `encoding` (newlines untranslated)."""
    return read_bytes(path, attempts=attempts).decode(encoding)


# ---------------------------------------------------------------------------- async


async def awrite_atomic(
    path: StrPath, data: bytes | str, *, mode: int | None = None, encoding: str = "utf-8"
) -> None:
    """The async twin of `write_atomic`: the write through aiofiles, the rest off the loop.

    Cancelled midway, the target still holds the old or the new content.
    """
    aiofiles = _aiofiles()
    payload = _encode(data, encoding)
    target, directory, temp, keep = await asyncio.to_thread(_names, path, mode)
    handle = await aiofiles.open(temp, "xb")  # O_EXCL, 0o666 minus the umask, like os.open
    try:
        try:
            if keep is not None:
                await asyncio.to_thread(os.chmod, temp, keep)
            await handle.write(payload)
            await handle.flush()
            await asyncio.to_thread(os.fsync, handle.fileno())
        finally:
            await handle.close()
        await asyncio.to_thread(os.replace, temp, target)
    except BaseException:
        _discard(temp)  # synchronous on purpose: it must run even when cancelled
        raise
    await asyncio.to_thread(_fsync_dir, directory)


async def aput(
    path: StrPath, data: bytes | str, *, mode: int | None = None, encoding: str = "utf-8"
) -> bool:
    """The async twin of `put`."""
    payload = _encode(data, encoding)
    target, same = await asyncio.to_thread(_holds, path, payload)
    if same:
        _report(target, False, len(payload))
        return False
    await awrite_atomic(target, payload, mode=mode)
    _report(target, True, len(payload))
    return True


async def aread_bytes(path: StrPath, *, attempts: int = 3) -> bytes:
    """The async twin of `read_bytes` (aiofiles)."""
    aiofiles = _aiofiles()
    attempt = 1
    while True:
        try:
            async with aiofiles.open(path, "rb") as handle:
                content: bytes = await handle.read()
                return content
        except OSError as exc:
            if exc.errno not in _TRANSIENT or attempt >= attempts:
                raise
        await RUNTIME.asleep(_backoff(attempt))
        attempt += 1


async def aread_text(path: StrPath, *, encoding: str = "utf-8", attempts: int = 3) -> str:
    """The async twin of `read_text`."""
    return (await aread_bytes(path, attempts=attempts)).decode(encoding)
