"""The public surface is curated: `__all__` is sorted and pinned."""

import nodekit as nk

EXPECTED = sorted(nk.__all__)


def test_all_is_sorted_and_exported() -> None:
    assert nk.__all__ == sorted(nk.__all__)
    for name in nk.__all__:
        assert hasattr(nk, name), name


def test_core_names_from_the_design_are_public() -> None:
    for name in ["node", "Retry", "Timeout", "Effect", "context", "resource", "use", "override"]:
        assert name in nk.__all__
