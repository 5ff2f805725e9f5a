"""torch.distributed / torchrun: which rank this process is, and which GPU it should use.

``ImageLoader`` takes ``shard_id``/``num_shards`` from ``torch.distributed`` when it is initialised,
and ``device="cuda"`` (or the default) means ``cuda:LOCAL_RANK`` under torchrun unless the script
already chose a GPU with ``torch.cuda.set_device``.
"""

from __future__ import annotations

import os


def rank_and_world() -> tuple[int, int] | None:
    """(rank, world size) from an initialised ``torch.distributed`` process group, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


def local_rank() -> int | None:
    """This process's rank on its machine (``LOCAL_RANK``, set by torchrun), or None."""
    value = os.environ.get("LOCAL_RANK")
    if value is None or not value.strip().lstrip("-").isdigit():
        return None
    return int(value)


def default_cuda_index() -> int:
    """The GPU a bare ``"cuda"`` means for this process.

    torch's current device when the script chose one (``torch.cuda.set_device``, anything but 0);
    otherwise ``LOCAL_RANK`` under torchrun when this process sees that many GPUs (a launcher that
    gives each process one GPU through ``CUDA_VISIBLE_DEVICES`` leaves it at 0); otherwise 0.
    """
    import torch

    current = torch.cuda.current_device()
    lr = local_rank()
    if current != 0 or lr is None:
        return current
    return lr if 0 <= lr < torch.cuda.device_count() else current


def local_world_size() -> int:
    """How many processes torchrun started on this machine (``LOCAL_WORLD_SIZE``), 1 outside torchrun."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "")
    return int(value) if value.isdigit() and int(value) > 0 else 1
