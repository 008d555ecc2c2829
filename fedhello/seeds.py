"""Seed derivation: every random stream of a run comes from its one ``seed`` through these.

Two derivations with two meanings:

* ``purpose_seed(seed, purpose)``: the run seed of a config to a 32-bit seed for one use
  (``"split"``, ``"partition"``, ``"tiers"``, ``"client/3/17"`` ...), so that changing one step
  does not reshuffle the others;
* ``client_seed(seed, client)``: a base seed to client ``client``'s own 63-bit stream (the LoRA
  dropout seeds of ``fedhello.nn``), independent across clients.
"""

from __future__ import annotations

import zlib

import numpy as np

__all__ = ["client_seed", "purpose_seed"]


def purpose_seed(seed: int, purpose: str) -> int:
    """An independent, stable 32-bit seed for one use (``"split"``, ``"partition"`` ...) of a run seed."""
    return int(np.random.SeedSequence([int(seed), zlib.crc32(purpose.encode())]).generate_state(1)[0])


def client_seed(seed: int, client: int) -> int:
    """A well-mixed 63-bit seed for ``client`` from a base ``seed`` (independent streams per client)."""
    return int(np.random.SeedSequence([int(seed), int(client)]).generate_state(1, dtype=np.uint64)[0] >> 1)
