"""The two seed derivations keep their values (runs reproduce across versions) and stay distinct."""

from __future__ import annotations

from fedhello.seeds import client_seed, purpose_seed


def test_purpose_seed_values_are_stable() -> None:
    assert purpose_seed(3, "partition") == 1858343481
    assert purpose_seed(0, "split") == 3770521055
    assert purpose_seed(3, "partition") != purpose_seed(3, "split") != purpose_seed(4, "split")
    assert all(0 <= purpose_seed(s, "x") < 2**32 for s in range(5))


def test_client_seed_values_are_stable() -> None:
    assert client_seed(7, 0) == 8460147692890830636
    assert client_seed(7, 5) == 4346648539189822640
    assert len({client_seed(7, c) for c in range(64)}) == 64
    assert all(0 <= client_seed(s, 3) < 2**63 for s in range(5))
