"""The `nodekit` command line inspects and resolves records in a real store."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import nodekit as nk
from nodekit.cli import main


@pytest.fixture
def url_and_key(tmp_path: Path) -> tuple[str, str]:
    """A SQLite store holding one completed record of node 'charge'; its URL and digest."""
    path = tmp_path / "keys.sqlite"
    store = nk.SQLiteStore(path)
    try:

        @nk.node(name="charge", idempotency=nk.Idempotency(key=lambda order: order, store=store))
        def charge(order: str) -> int:
            return 1

        charge("o-1")
        with store._use() as conn:
            digest = conn.execute("SELECT key_digest FROM nodekit_idempotency").fetchone()[0]
    finally:
        store.close()
    return f"sqlite:///{path}", digest


def test_version_prints_the_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == nk.__version__


def test_stats_counts_records_per_namespace_and_state(
    url_and_key: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = url_and_key
    assert main(["store", "stats", url]) == 0
    assert capsys.readouterr().out.splitlines() == ["charge\tCOMPLETED\t1"]


def test_show_prints_a_record_without_its_result(
    url_and_key: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    url, digest = url_and_key
    assert main(["store", "show", url, "charge", digest]) == 0
    out = capsys.readouterr().out
    assert "state: COMPLETED" in out
    assert "result stored: True" in out
    assert f"key_digest: {digest}" in out
    assert "o-1" not in out  # the raw key never appears, nor the stored result
    # the holder that acquired it: this test process (alive), on this host
    holder = next(line for line in out.splitlines() if line.startswith("holder: "))
    assert f"pid {os.getpid()}" in holder
    assert socket.gethostname() in holder


def test_resolve_deletes_the_record_so_the_key_runs_again(
    url_and_key: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    url, digest = url_and_key
    assert main(["store", "resolve", url, "charge", digest]) == 0
    assert capsys.readouterr().out.strip() == "deleted"
    assert main(["store", "show", url, "charge", digest]) == 1
    assert main(["store", "resolve", url, "charge", digest]) == 1


def test_a_store_without_statistics_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["store", "stats", "memory://"]) == 2
    assert "does not report statistics" in capsys.readouterr().err


def test_an_unknown_url_scheme_is_a_one_line_error_naming_the_schemes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["store", "stats", "ftp://nowhere"]) == 2
    err = capsys.readouterr().err
    assert "memory://" in err
    assert "sqlite:///path" in err
    assert len(err.strip().splitlines()) == 1


def test_the_console_script_and_python_m_run_the_same_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "nodekit", "version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == nk.__version__
