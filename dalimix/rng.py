"""Every random stream in dalimix comes from (seed, purpose, ...keys): runs are reproducible and resumable.

Two runs with one seed give the same batches; a resumed run draws the same numbers for step k as
the uninterrupted one, because nothing depends on how many numbers were drawn before.
"""

from __future__ import annotations

import numpy as np

SHUFFLE = 1  # epoch permutation: (seed, SHUFFLE, epoch), the same on every rank
DALI = 2  # DALI pipeline seed (auto_augment presets only): (seed, DALI, rank)
MIX = 3  # mix planner: (seed, MIX, rank, epoch, step)
POLICY = 4  # augmentation policy sampling: (seed, POLICY, rank, epoch, step)
CROP = 5  # random resized crop windows and flips fed to DALI: (seed, CROP, rank, epoch, step)


def generator(seed: int, purpose: int, *keys: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(purpose), *map(int, keys)])))


def derive_seed(seed: int, purpose: int, *keys: int) -> int:
    """A 31-bit seed (DALI takes a non-negative int) derived from the keys."""
    state = np.random.SeedSequence([int(seed), int(purpose), *map(int, keys)]).generate_state(1)[0]
    return int(state) & 0x7FFFFFFF
