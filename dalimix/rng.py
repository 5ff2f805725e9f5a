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
ERASE = 6  # random erasing boxes and noise: (seed, ERASE, rank, epoch, step)


def generator(seed: int, purpose: int, *keys: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(purpose), *map(int, keys)])))


def derive_seed(seed: int, purpose: int, *keys: int) -> int:
    """A 31-bit seed (DALI takes a non-negative int) derived from the keys."""
    state = np.random.SeedSequence([int(seed), int(purpose), *map(int, keys)]).generate_state(1)[0]
    return int(state) & 0x7FFFFFFF


def script_seed() -> int:
    """The seed a loader takes when none is given: what the training script seeded torch with.

    ``torch.initial_seed()`` (set by ``torch.manual_seed(s)``, by timm's ``utils.random_seed``, by
    Lightning's ``seed_everything``; a fresh random value per process when the script seeds nothing,
    as PyTorch's own ``DataLoader`` shuffling). Under an initialised ``torch.distributed`` with more
    than one rank, rank 0's value is broadcast (a collective: every rank builds its loaders in the
    same order), so all ranks share one stream even when each seeded ``seed + rank`` (timm does).
    Reduced to 63 bits.
    """
    import torch

    seed = int(torch.initial_seed()) & 0x7FFFFFFFFFFFFFFF
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            box = [seed]
            dist.broadcast_object_list(box, src=0)
            seed = int(box[0])
    except (ImportError, RuntimeError):  # pragma: no cover - no backend: keep this rank's own seed
        pass
    return seed
