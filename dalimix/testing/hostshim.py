"""Run the CUDA C kernels on the CPU: a host shim compiled with g++ and called through ctypes.

The shim turns ``__global__``/``__device__``/``__host__`` into nothing, makes ``blockIdx``,
``threadIdx``, ``blockDim`` and ``gridDim`` thread-local variables, and wraps every entry point of
``dalimix.ops.kernels.ENTRIES`` in a loop over the whole grid. The kernel source is compiled
unchanged, so the tests check the very code the GPU runs (minus the compiler). Kernels must not
use shared memory, barriers or atomics: the shim refuses sources that do.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from dalimix.ops.kernels import ENTRIES, KERNEL_FILES, kernel_dir

SHIM_PRELUDE = r"""
#include <math.h>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
struct dm_shim_dim3 { unsigned int x, y, z; };
static thread_local dm_shim_dim3 blockIdx, threadIdx, blockDim, gridDim;
"""

_UNSUPPORTED = re.compile(r"__shared__|__syncthreads|__syncwarp|atomic[A-Z]\w*\(|__shfl")


def _wrapper(name: str, args: tuple[tuple[str, str], ...]) -> str:
    params = ", ".join(f"{ctype} {arg}" for arg, ctype in args)
    names = ", ".join(arg for arg, _ in args)
    return f"""
extern "C" void shim_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, {params}) {{
  gridDim = {{gx, gy, gz}};
  blockDim = {{bx, by, bz}};
  for (unsigned z = 0; z < gz; ++z) for (unsigned y = 0; y < gy; ++y) for (unsigned x = 0; x < gx; ++x)
    for (unsigned tz = 0; tz < bz; ++tz) for (unsigned ty = 0; ty < by; ++ty) for (unsigned tx = 0; tx < bx; ++tx) {{
      blockIdx = {{x, y, z}};
      threadIdx = {{tx, ty, tz}};
      {name}({names});
    }}
}}
"""


def shim_source() -> str:
    """The C++ translation unit: prelude, every kernel file, one wrapper per entry point."""
    parts = [SHIM_PRELUDE]
    for file in KERNEL_FILES:
        text = (kernel_dir() / file).read_text()
        bad = _UNSUPPORTED.search(text)
        if bad:
            raise ValueError(f"{file} uses {bad.group(0)!r}, which the host shim cannot emulate")
        parts.append(f'#include "{file}"')
    parts += [_wrapper(e.name, e.args) for e in ENTRIES.values()]
    return "\n".join(parts)


def _ctype(ctype: str):
    if ctype.endswith("*"):
        return ctypes.c_void_p
    return {"int": ctypes.c_int, "float": ctypes.c_float, "unsigned int": ctypes.c_uint}[ctype]


class HostShim:
    """The kernels compiled for the host. ``launch(name, grid, block, *args)`` runs one entry point."""

    def __init__(self, build_dir: str | os.PathLike | None = None, cxx: str | None = None):
        cxx = cxx or os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
        if cxx is None:
            raise RuntimeError("the host shim needs a C++ compiler (g++); install one or set CXX")
        src = shim_source()
        headers = "".join(p.read_text() for p in sorted(kernel_dir().glob("*.cuh")))
        digest = hashlib.sha256((src + headers).encode()).hexdigest()[:16]
        build = Path(build_dir or Path(tempfile.gettempdir()) / "dalimix-hostshim")
        build.mkdir(parents=True, exist_ok=True)
        lib = build / f"shim-{digest}.so"
        if not lib.exists():
            cpp = build / f"shim-{digest}.cpp"
            cpp.write_text(src)
            tmp = build / f"shim-{digest}.{os.getpid()}.so"
            cmd = [
                cxx,
                "-std=c++17",
                "-O2",
                "-shared",
                "-fPIC",
                "-Wall",
                "-Werror",
                "-Wno-unused-function",
                f"-I{kernel_dir()}",
                str(cpp),
                "-o",
                str(tmp),
            ]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"host shim failed to compile:\n{' '.join(cmd)}\n{res.stderr}")
            os.replace(tmp, lib)
        self.path = lib
        self._lib = ctypes.CDLL(str(lib))
        self._fns = {}
        for e in ENTRIES.values():
            fn = getattr(self._lib, f"shim_{e.name}")
            fn.restype = None
            fn.argtypes = [ctypes.c_uint] * 6 + [_ctype(c) for _, c in e.args]
            self._fns[e.name] = fn

    def launch(self, name: str, grid, block, *args) -> None:
        """Run entry ``name`` over ``grid`` x ``block`` (ints or 3-tuples); numpy arrays pass as pointers,
        None as a null pointer."""
        grid = (grid, 1, 1) if isinstance(grid, int) else tuple(grid) + (1,) * (3 - len(grid))
        block = (block, 1, 1) if isinstance(block, int) else tuple(block) + (1,) * (3 - len(block))
        entry = ENTRIES[name]
        if len(args) != len(entry.args):
            raise TypeError(f"{name} takes {len(entry.args)} arguments, got {len(args)}")
        conv = []
        for a, (arg, ctype) in zip(args, entry.args):
            if ctype.endswith("*") and a is None:
                conv.append(None)
            elif ctype.endswith("*"):
                if not isinstance(a, np.ndarray) or not a.flags.c_contiguous:
                    raise TypeError(f"{name}: argument {arg} must be a C-contiguous numpy array")
                conv.append(a.ctypes.data)
            else:
                conv.append(a)
        self._fns[name](*grid, *block, *conv)


def half_bits_to_float(bits: np.ndarray) -> np.ndarray:
    """uint16 IEEE half patterns -> float32."""
    return bits.view(np.float16).astype(np.float32)


def bf16_bits_to_float(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 patterns -> float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)
