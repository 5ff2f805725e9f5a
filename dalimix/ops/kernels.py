"""Where the CUDA C sources live and what their entry points take.

The sources are in ``kernels/`` at the top of the source tree and ship inside the wheel as
``dalimix/kernels/``. ``ENTRIES`` is the one description of every entry point's arguments: the
CUDA backend launches from it and the host shim (``dalimix.testing.hostshim``) wraps from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

KERNEL_FILES = ("mix_normalize.cu",)

# torch dtype -> (entry-name fragment, C type of one output element)
OUTPUT_TYPES = {
    torch.float32: ("f32", "float"),
    torch.float16: ("f16", "unsigned short"),
    torch.bfloat16: ("bf16", "unsigned short"),
}


@dataclass(frozen=True)
class Entry:
    """One ``extern "C" __global__`` function: its source file and ``(name, C type)`` arguments."""

    name: str
    file: str
    args: tuple[tuple[str, str], ...]


def _mix_normalize_entries() -> dict[str, Entry]:
    entries = {}
    for tag, ctype in OUTPUT_TYPES.values():
        for layout in ("nchw", "nhwc"):
            name = f"dalimix_mix_normalize_{tag}_{layout}"
            args = (
                ("src", "const unsigned char*"),
                ("rec", "const DmRecord*"),
                ("masks", "const float*"),
                ("gather", "const int*"),
                ("dst", f"{ctype}*"),
                ("n", "int"),
                ("h", "int"),
                ("w", "int"),
                ("m0", "float"),
                ("m1", "float"),
                ("m2", "float"),
                ("s0", "float"),
                ("s1", "float"),
                ("s2", "float"),
                ("erase", "const int*"),  # n x ERASE_STRIDE int32 erase table, or null (dalimix.ops.record)
            )
            entries[name] = Entry(name, "mix_normalize.cu", args)
    return entries


ENTRIES: dict[str, Entry] = _mix_normalize_entries()


PIXELS_PER_THREAD = 4  # DM_PIX in mix_normalize.cu: one thread writes 4 pixels of a row
MAX_BLOCK = 256  # DM_BLOCK: the kernels' __launch_bounds__
MAX_SAMPLES = 65535  # gridDim.z; more samples are walked grid-stride


def launch_config(n: int, height: int, width: int, *, sms: int | None = None, rows_per_thread: int = 4):
    """``(grid, block)`` 3-tuples for the mixing kernels: samples on z, rows on y, 4-pixel column groups on x.

    One block row of threads covers a whole image row (up to 1024 pixels per block), each thread then
    walks down ``rows_per_thread`` rows; with ``sms`` (the GPU's multiprocessor count) fewer rows per
    thread are used where the grid would otherwise not fill the GPU. Any grid is correct (the kernels
    are grid-stride in all three dimensions); this one is the fast one.
    """
    groups = max(1, -(-width // PIXELS_PER_THREAD))
    bx = min(groups, MAX_BLOCK)
    by = max(1, min(MAX_BLOCK // bx, height))
    gx = -(-groups // bx)
    gz = max(1, min(n, MAX_SAMPLES))
    rows = max(1, rows_per_thread)
    while True:
        gy = max(1, min(-(-height // (by * rows)), 65535))
        if rows == 1 or sms is None or gx * gy * gz >= 4 * sms:
            break
        rows //= 2
    return (gx, gy, gz), (bx, by, 1)


def mix_normalize_entry(dtype: torch.dtype, channels_last: bool) -> str:
    """Name of the entry point writing ``dtype`` in NCHW or channels_last order."""
    if dtype not in OUTPUT_TYPES:
        raise ValueError(f"output dtype {dtype} is not supported; use one of {sorted(map(str, OUTPUT_TYPES))}")
    return f"dalimix_mix_normalize_{OUTPUT_TYPES[dtype][0]}_{'nhwc' if channels_last else 'nchw'}"


@lru_cache(maxsize=1)
def kernel_dir() -> Path:
    """Directory holding the ``.cu``/``.cuh`` sources: the installed package's copy, else the source tree's."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "kernels", here.parent / "kernels"):
        if (candidate / KERNEL_FILES[0]).is_file():
            return candidate
    raise FileNotFoundError(
        f"dalimix kernel sources not found next to {here} (looked in {here / 'kernels'} and "
        f"{here.parent / 'kernels'}); reinstall dalimix so that its kernels/ folder is included"
    )


def kernel_source(file: str) -> str:
    """Text of one kernel source file."""
    return (kernel_dir() / file).read_text()
