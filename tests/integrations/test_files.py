"""`nodekit.files`: atomic writes (old or new content, never partial), idempotent put, reads.

Crashes are real: a worker process rewriting a big file is SIGKILLed at random moments.
Failures at each step are injected in-process by making one `os` call fail.
"""

from __future__ import annotations

import asyncio
import builtins
import errno
import os
import random
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiofiles
import pytest
from aiofiles.threadpool.binary import AsyncBufferedIOBase

import nodekit as nk
from nodekit import files
from nodekit.testing import Instant, capture_events

WORKER = Path(__file__).with_name("_kill_worker.py")


@pytest.fixture(params=["sync", "async"])
def io(request: pytest.FixtureRequest) -> str:
    """Run the test with the sync function and with its async twin."""
    return str(request.param)


def write(io: str, path: Path, data: bytes | str, **options: Any) -> None:
    if io == "sync":
        files.write_atomic(path, data, **options)
    else:
        asyncio.run(files.awrite_atomic(path, data, **options))


def put(io: str, path: Path, data: bytes | str, **options: Any) -> bool:
    if io == "sync":
        return files.put(path, data, **options)
    return asyncio.run(files.aput(path, data, **options))


def read(io: str, path: Path, text: bool = False, **options: Any) -> Any:
    if io == "sync":
        return (files.read_text if text else files.read_bytes)(path, **options)
    return asyncio.run((files.aread_text if text else files.aread_bytes)(path, **options))


def leftovers(directory: Path, target: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p != target)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------- writes


def test_write_creates_and_replaces(io: str, tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    write(io, target, "first")
    write(io, target, b"second")
    assert target.read_bytes() == b"second"
    write(io, target, "dé", encoding="latin-1")
    assert target.read_bytes() == "dé".encode("latin-1")
    assert leftovers(tmp_path, target) == []


def test_existing_permissions_are_kept(io: str, tmp_path: Path) -> None:
    target = tmp_path / "config"
    target.write_text("old")
    target.chmod(0o640)
    write(io, target, "new")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert target.read_text() == "new"


def test_mode_and_umask_for_new_files(io: str, tmp_path: Path) -> None:
    fresh, private = tmp_path / "fresh", tmp_path / "private"
    write(io, fresh, "x")
    write(io, private, "x", mode=0o600)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~current_umask()
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_symlink_target_is_replaced_not_the_link(io: str, tmp_path: Path) -> None:
    real, link = tmp_path / "real", tmp_path / "link"
    real.write_text("old")
    link.symlink_to(real)
    write(io, link, "new")
    assert link.is_symlink()
    assert real.read_text() == "new"


def test_rejects_other_data_types(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="bytes or str"):
        files.write_atomic(tmp_path / "x", 42)  # type: ignore[arg-type]


@contextmanager
def failing(
    monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, call: int = 1, run_first: bool = False
) -> Iterator[None]:
    """Make the `call`-th call of ``owner.name`` raise EIO (after running it, if `run_first`)."""
    real = getattr(owner, name)
    count = [0]

    def fake(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        if count[0] != call:
            return real(*args, **kwargs)
        if run_first:
            real(*args, **kwargs)
        raise OSError(errno.EIO, f"injected failure in {name}")

    with monkeypatch.context() as patch:
        patch.setattr(owner, name, fake)
        yield
    assert count[0] >= call, f"{name} was not reached"


SYNC_STEPS: dict[str, dict[str, Any]] = {
    "open": {"owner": os, "name": "open"},
    "chmod": {"owner": os, "name": "chmod"},
    "write": {"owner": os, "name": "write"},
    "fsync": {"owner": os, "name": "fsync"},
    "close": {"owner": os, "name": "close", "run_first": True},
    "replace": {"owner": os, "name": "replace"},
}
ASYNC_STEPS: dict[str, dict[str, Any]] = {
    "open": {"owner": aiofiles, "name": "open"},
    "chmod": {"owner": os, "name": "chmod"},
    "write": {"owner": AsyncBufferedIOBase, "name": "write"},
    "fsync": {"owner": os, "name": "fsync"},
    "replace": {"owner": os, "name": "replace"},
}


@pytest.mark.parametrize("step", sorted(SYNC_STEPS))
def test_failure_at_each_step_keeps_the_old_content_and_no_temp(
    step: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "data.bin"
    target.write_bytes(b"old" * 1000)
    with failing(monkeypatch, **SYNC_STEPS[step]), pytest.raises(OSError, match="injected"):
        files.write_atomic(target, b"new" * 1000)
    assert target.read_bytes() == b"old" * 1000
    assert leftovers(tmp_path, target) == []


@pytest.mark.parametrize("step", sorted(ASYNC_STEPS))
async def test_async_failure_at_each_step_keeps_the_old_content_and_no_temp(
    step: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "data.bin"
    target.write_bytes(b"old" * 1000)
    spec = ASYNC_STEPS[step]
    if spec["owner"] is AsyncBufferedIOBase:

        async def broken(self: Any, data: bytes) -> int:
            raise OSError(errno.EIO, "injected failure in write")

        monkeypatch.setattr(AsyncBufferedIOBase, "write", broken)
        with pytest.raises(OSError, match="injected"):
            await files.awrite_atomic(target, b"new" * 1000)
    else:
        with failing(monkeypatch, **spec), pytest.raises(OSError, match="injected"):
            await files.awrite_atomic(target, b"new" * 1000)
    assert target.read_bytes() == b"old" * 1000
    assert leftovers(tmp_path, target) == []


def test_directory_fsync_failure_leaves_the_new_content(
    io: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rename happened; only its durability is in doubt: the error says so, no temp left."""
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    with failing(monkeypatch, os, "fsync", call=2), pytest.raises(OSError, match="injected"):
        write(io, target, b"new")
    assert target.read_bytes() == b"new"
    assert leftovers(tmp_path, target) == []


async def test_cancelled_async_write_keeps_old_or_new_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    started = asyncio.Event()
    loop = asyncio.get_running_loop()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        loop.call_soon_threadsafe(started.set)
        time.sleep(0.2)  # a slow disk, in the worker thread
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    task = asyncio.create_task(files.awrite_atomic(target, b"new"))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.3)  # let the abandoned fsync thread finish
    assert target.read_bytes() in (b"old", b"new")
    assert leftovers(tmp_path, target) == []


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_at_random_moments_never_leaves_a_partial_file(mode: str, tmp_path: Path) -> None:
    """A worker rewriting a 4 MB file is SIGKILLed at random: the file is always one version."""
    target = tmp_path / "big.bin"
    size = 4 * 1024 * 1024
    rng = random.Random(20240607 + len(mode))
    for _ in range(3):
        worker = subprocess.Popen(
            [sys.executable, str(WORKER), str(target), str(size), mode],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert worker.stdout is not None
            assert worker.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.01, 0.2))  # an arbitrary moment in the write cycle
        finally:
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=10)
            if worker.stdout is not None:
                worker.stdout.close()
        content = target.read_bytes()
        assert len(content) == size
        assert content == content[:1] * size
        # A killed process cannot clean up: at most its own temporary file is left behind.
        assert all(name.startswith(".big.bin.") for name in leftovers(tmp_path, target))


# ---------------------------------------------------------------------------- put


def test_put_writes_only_when_the_content_differs(io: str, tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    with capture_events(prefix="files.") as events:
        assert put(io, target, '{"a": 1}') is True
        inode = target.stat().st_ino
        assert put(io, target, b'{"a": 1}') is False
        assert target.stat().st_ino == inode  # untouched
        assert put(io, target, '{"a": 2}') is True
    assert target.read_text() == '{"a": 2}'
    assert [event["written"] for event in events.named("files.put")] == [True, False, True]
    assert events[0]["path"] == str(target.resolve())


def test_put_in_a_retried_node_writes_once(io: str, tmp_path: Path, waits: Instant) -> None:
    """A node that puts and then fails transiently rewrites nothing on its retry."""
    target = tmp_path / "report.txt"
    writes: list[bool] = []

    @nk.node(name="report", retry=nk.Retry(attempts=3, jitter=0))
    def report() -> None:
        writes.append(put(io, target, "total: 3"))
        if nk.context().attempt == 1:
            raise ConnectionRefusedError("upload refused")  # safe: retried

    report()
    assert writes == [True, False]


# ---------------------------------------------------------------------------- reads


def flaky(real: Callable[..., Any], failures: list[int]) -> Callable[..., Any]:
    """Raise the errnos in `failures` one by one, then behave like `real`."""

    def opener(*args: Any, **kwargs: Any) -> Any:
        if failures:
            code = failures.pop(0)
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    return opener


def patch_open(io: str, monkeypatch: pytest.MonkeyPatch, failures: list[int]) -> None:
    if io == "sync":
        monkeypatch.setattr(files, "open", flaky(builtins.open, failures), raising=False)
    else:
        monkeypatch.setattr(aiofiles, "open", flaky(aiofiles.open, failures))


def test_read_retries_transient_errors(
    io: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, waits: Instant
) -> None:
    target = tmp_path / "in.txt"
    target.write_text("hello")
    patch_open(io, monkeypatch, [errno.EAGAIN, errno.EBUSY])
    assert read(io, target, text=True) == "hello"
    assert waits.sleeps == [0.01, 0.02]


def test_read_gives_up_after_its_attempts(
    io: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, waits: Instant
) -> None:
    target = tmp_path / "in.txt"
    target.write_bytes(b"x")
    patch_open(io, monkeypatch, [errno.EAGAIN] * 3)
    with pytest.raises(BlockingIOError):
        read(io, target, attempts=3)
    assert len(waits.sleeps) == 2


def test_read_does_not_retry_permanent_errors(io: str, tmp_path: Path, waits: Instant) -> None:
    with pytest.raises(FileNotFoundError):
        read(io, tmp_path / "missing")
    assert waits.sleeps == []
    (tmp_path / "b").write_bytes(b"\x00\x01")
    assert read(io, tmp_path / "b") == b"\x00\x01"


def test_missing_aiofiles_gives_an_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sync functions need nothing; the async ones say which extra to install."""
    monkeypatch.setitem(sys.modules, "aiofiles", None)
    files.write_atomic(tmp_path / "x", "sync works")
    with pytest.raises(ImportError, match=r"pip install 'nodekit\[files\]'"):
        asyncio.run(files.awrite_atomic(tmp_path / "x", "async needs aiofiles"))
