"""The README's examples run as written (those that need no outside network)."""

import os
import re
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
OFFLINE = [block for block in BLOCKS if "example.com" not in block]


def test_the_readme_has_runnable_examples() -> None:
    assert len(OFFLINE) >= 4


def test_readme_examples_run_in_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Blocks share one namespace, as a reader pasting them into one file would."""
    cwd = os.getcwd()
    os.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme"}
    sys.modules["readme"] = type(sys)("readme")  # pydantic needs the module to exist
    try:
        for block in OFFLINE:
            exec(compile(block, str(README), "exec"), namespace)
    finally:
        os.chdir(cwd)
        sys.modules.pop("readme", None)
        store = namespace.get("store")
        if store is not None:
            store.close()  # type: ignore[attr-defined]
    out = capsys.readouterr().out
    assert "sunny in Lisbon; stay at Lisbon Grand" in out
    assert "sunny in Porto; stay at Porto Grand" in out
    assert "refused: the same key with another payload" in out
    assert "{'pong': True}" in out
    assert "refused: " in out.split("{'pong': True}")[1]
