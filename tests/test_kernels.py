"""The CUDA C sources, checked without a GPU: nvcc (registers, spills), NVRTC (the run-time
compiler CuPy uses) and the host shim against the float64 reference."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from reference import random_records, reference_mix_normalize

from dalimix.ops import Normalization
from dalimix.ops.kernels import (
    ENTRIES,
    KERNEL_FILES,
    OUTPUT_TYPES,
    kernel_dir,
    kernel_source,
    launch_config,
    mix_normalize_entry,
)
from dalimix.ops.record import (
    FLAG_BILINEAR,
    FLAG_FLIP_PARTNER,
    FLAG_FLIP_SELF,
    RECORD_DTYPE,
    identity_records,
    set_flips,
)
from dalimix.testing.hostshim import SHIM_PRELUDE, bf16_bits_to_float, half_bits_to_float

NVCC = shutil.which("nvcc")


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH (install the CUDA toolkit to check registers and spills)")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("file", KERNEL_FILES)
def test_nvcc_compiles_without_spills(tmp_path, arch, file):
    cmd = [
        NVCC,
        "-cubin",
        f"-arch={arch}",
        "--resource-usage",
        "-Werror",
        "all-warnings",
        f"-I{kernel_dir()}",
        str(kernel_dir() / file),
        "-o",
        str(tmp_path / "k.cubin"),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    log = res.stdout + res.stderr
    entries = re.findall(r"Compiling entry function '(\w+)'", log)
    assert sorted(entries) == sorted(e.name for e in ENTRIES.values() if e.file == file)
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    assert spills and not any(spills), f"register spills for {arch}:\n{log}"
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    assert max(regs) <= 64, f"more than 64 registers per thread limits occupancy:\n{log}"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("file", KERNEL_FILES)
def test_nvrtc_compiles_runtime_source(arch, file, monkeypatch):
    """The exact text and options CuPy 14's RawModule compiles at run time, through CuPy's own
    NVRTC path (only the device query and, without a GPU, the module load are stood in for).

    CuPy adds to dalimix's options its include paths, ``-ftz=true``, ``-arch=sm_XX`` (a cubin:
    NVRTC 13 knows up to sm_121) and ``--device-as-default-execution-space``.

    fp32 subnormals: ``-ftz=true`` makes every fp32 operation the compiler emits flush subnormal
    inputs and results to sign-preserving zero on the GPU (``.ftz`` on each f32 instruction in the
    PTX, checked below); the host shim, built by g++, keeps them. The kernel's values are uint8
    pixels, blend weights and mask values in [0, 1] and normalised outputs of order 1: only a
    weight or mask value below 1.18e-38 is subnormal, and its share of an output (< 1e-35) is
    lost in any dtype's rounding, so GPU and host shim agree on every output the tests compare.
    """
    import contextlib
    import os

    cupy = pytest.importorskip("cupy")
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings (NVRTC) is not installed")
    from cupy._core import core
    from cupy.cuda import compiler

    from dalimix.ops import cuda as dm_cuda

    # 1. dalimix's RawModule arguments, as dalimix.ops.cuda builds them
    made = {}

    class RawModule:
        def __init__(self, **kw):
            made.update(kw)

        def get_function(self, name):
            return name

    monkeypatch.setattr(cupy, "RawModule", RawModule)
    monkeypatch.setattr(cupy.cuda, "Device", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(dm_cuda, "_modules", {})
    entry = next(name for name, e in ENTRIES.items() if e.file == file)
    dm_cuda._function(torch.device("cuda", 0), entry)
    assert made["code"] == kernel_source(file)

    # 2. CuPy's compile of them (RawModule -> compile_with_cache), recording what NVRTC receives
    monkeypatch.setenv("CUPY_CACHE_IN_MEMORY", "1")  # no cubin from the disk cache: CuPy compiles
    monkeypatch.setattr(compiler, "_get_arch", lambda: arch)
    arch_option = compiler._get_arch_for_options_for_nvrtc.__wrapped__  # CuPy's own choice, minus the device cache
    monkeypatch.setattr(compiler, "_get_arch_for_options_for_nvrtc", lambda a=None: arch_option(a or arch))
    compiled = []
    real_compile = compiler._NVRTCProgram.compile

    def compile_and_record(self, options=(), log_stream=None):
        result = real_compile(self, options, log_stream)
        compiled.append(tuple(options))
        return result

    monkeypatch.setattr(compiler._NVRTCProgram, "compile", compile_and_record)
    kw = {
        k: made[k]
        for k in ("backend", "translate_cucomplex", "enable_cooperative_groups", "name_expressions", "jitify")
        if k in made
    }
    try:
        core.compile_with_cache(made["code"], tuple(made.get("options", ())), prepend_cupy_headers=False, **kw)
    except compiler.CompileException as exc:
        pytest.fail(f"NVRTC rejects {file} for sm_{arch}:\n{exc}")
    except (cupy.cuda.runtime.CUDARuntimeError, cupy.cuda.driver.CUDADriverError):
        if torch.cuda.is_available():  # loading the cubin needs a GPU; where there is one, it must load
            raise
    opts = compiled[-1]
    for flag in (
        "--std=c++17",
        f"-I{kernel_dir()}",
        "-ftz=true",
        f"-arch=sm_{arch}",
        "--device-as-default-execution-space",
    ):
        assert flag in opts, f"{flag} not among CuPy's NVRTC options {opts}"

    # 3. the same options to PTX: every fp32 operation flushes subnormals
    ptx_opts = [o.encode() for o in opts if not o.startswith("-arch=")] + [f"-arch=compute_{arch}".encode()]
    err, prog = nvrtc.nvrtcCreateProgram(made["code"].encode(), os.path.basename(file).encode(), 0, [], [])
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(ptx_opts), ptx_opts)
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS
    _, size = nvrtc.nvrtcGetPTXSize(prog)
    ptx = b" " * size
    nvrtc.nvrtcGetPTX(prog, ptx)
    f32_ops = re.findall(
        r"^\s*((?:add|sub|mul|fma|mad|div|rcp|sqrt|rsqrt|min|max|neg|abs|ex2|lg2|setp)\.[\w.]*f32)\b",
        ptx.decode(),
        flags=re.M,
    )
    assert f32_ops, "no fp32 arithmetic found in the PTX"
    assert all(".ftz" in op for op in f32_ops), sorted({op for op in f32_ops if ".ftz" not in op})


def test_record_layout_matches_struct(tmp_path):
    """RECORD_DTYPE mirrors struct DmRecord field by field (offsets from the C++ compiler)."""
    fields = list(RECORD_DTYPE.names)
    src = "#include <cstdio>\n#include <cstddef>\n" + SHIM_PRELUDE
    src += '#include "dalimix_common.cuh"\nint main() {\n  printf("%zu\\n", sizeof(DmRecord));\n'
    src += "".join(f'  printf("%zu\\n", offsetof(DmRecord, {f}));\n' for f in fields) + "}\n"
    (tmp_path / "layout.cpp").write_text(src)
    subprocess.run(
        ["g++", "-std=c++17", f"-I{kernel_dir()}", str(tmp_path / "layout.cpp"), "-o", str(tmp_path / "layout")],
        check=True,
    )
    out = [
        int(v)
        for v in subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True, check=True).stdout.split()
    ]
    assert out[0] == RECORD_DTYPE.itemsize
    assert out[1:] == [RECORD_DTYPE.fields[f][1] for f in fields]


def _special_floats(rng) -> np.ndarray:
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    edges = np.array(
        [
            0.0,
            -0.0,
            np.inf,
            -np.inf,
            np.nan,
            65504,
            65519.99,
            65520,
            65536,
            6.1e-5,
            5.96e-8,
            2.98e-8,
            2.9802322e-08,
            1e-40,
            3.4e38,
            1.0,
            -1.0,
            0.5,
            1 + 2**-11,
            1 + 3 * 2**-11,
        ],
        dtype=np.float32,
    )
    # ties and near-ties of half and bfloat16 rounding
    ties = (np.arange(-2000, 2000, dtype=np.int64) << 13).astype(np.uint32) | 0x1000
    return np.concatenate([bits.view(np.float32), edges, ties.view(np.float32), (ties + 1).view(np.float32)])


def test_f16_and_bf16_rounding_matches_numpy_and_torch(shim, tmp_path):
    """dm_f32_to_f16 / dm_f32_to_bf16 round to nearest even exactly like numpy and torch."""
    src = (
        '#include "dalimix_common.cuh"\n'
        'extern "C" void to_f16(const float* x, unsigned short* y, int n) { for (int i = 0; i < n; ++i) y[i] = dm_f32_to_f16(x[i]); }\n'
        'extern "C" void to_bf16(const float* x, unsigned short* y, int n) { for (int i = 0; i < n; ++i) y[i] = dm_f32_to_bf16(x[i]); }\n'
    )
    (tmp_path / "cast.cpp").write_text(SHIM_PRELUDE + src)
    lib = tmp_path / "cast.so"
    subprocess.run(
        ["g++", "-O2", "-shared", "-fPIC", f"-I{kernel_dir()}", str(tmp_path / "cast.cpp"), "-o", str(lib)], check=True
    )
    import ctypes

    so = ctypes.CDLL(str(lib))
    x = _special_floats(np.random.default_rng(0))
    y16 = np.empty(len(x), np.uint16)
    ybf = np.empty(len(x), np.uint16)
    so.to_f16(ctypes.c_void_p(x.ctypes.data), ctypes.c_void_p(y16.ctypes.data), ctypes.c_int(len(x)))
    so.to_bf16(ctypes.c_void_p(x.ctypes.data), ctypes.c_void_p(ybf.ctypes.data), ctypes.c_int(len(x)))
    with np.errstate(over="ignore"):
        want16 = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    assert np.array_equal(y16[~nan], want16[~nan])
    assert np.isnan(half_bits_to_float(y16[nan])).all()
    wantbf = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ybf[~nan], wantbf[~nan])
    assert np.isnan(bf16_bits_to_float(ybf[nan])).all()


PIXEL_SLACK = 2e-3  # grey levels: float32 arithmetic on 0..255 values, FMA or not, stays well inside


def ulp_tolerance(ref: np.ndarray, dtype: torch.dtype, norm) -> np.ndarray:
    """How far a correct result may be from the float64 reference ``ref`` (n x 3 x H x W): one unit in
    the last place of ``dtype`` (the float32 value may round to the other neighbour), plus the
    float32 error of mixing 0..255 values (resampling coordinates with or without FMA differ by an
    ulp), ``PIXEL_SLACK`` grey levels scaled by each channel's 1 / (255 std)."""
    mant = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}[dtype]
    tiny = {torch.float32: 2.0**-126, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-126}[dtype]
    exp = np.floor(np.log2(np.maximum(np.abs(ref), 1e-30)))
    slack = PIXEL_SLACK * np.asarray(norm.inv_std255, dtype=np.float64).reshape(1, 3, 1, 1)
    return np.maximum(2.0 ** (exp - mant), tiny) + slack + 1e-7 * np.abs(ref)


def stable_seed(*key) -> int:
    """A seed from test parameters that is the same in every process (unlike hash() of strings)."""
    import zlib

    return zlib.crc32(repr(key).encode())


def run_shim(
    shim,
    images,
    records,
    pool,
    norm,
    dtype,
    channels_last,
    grid=None,
    block=None,
    misalign=False,
    gather=None,
    erase=None,
):
    """Run the kernel through the host shim; by default with the CUDA backend's launch configuration.
    ``misalign``: the output starts 4 bytes past a 16-byte boundary (forces the scalar path);
    ``erase``: the erase table (None: a null pointer)."""
    n = len(records)
    _, h, w, _ = images.shape
    if grid is None:
        grid, block = launch_config(n, h, w)
    np_out = np.float32 if dtype == torch.float32 else np.uint16
    shape = (n, h, w, 3) if channels_last else (n, 3, h, w)
    if misalign:
        raw = np.zeros(int(np.prod(shape)) + 16, np_out)
        skip = (-raw.ctypes.data % 16 + 4) % 16 // raw.itemsize
        out = raw[skip : skip + int(np.prod(shape))].reshape(shape)
        assert out.ctypes.data % 16 == 4
    else:
        out = np.zeros(shape, np_out)
    shim.launch(
        mix_normalize_entry(dtype, channels_last),
        grid,
        block,
        images,
        records,
        pool,
        np.zeros(1, np.int32) if gather is None else np.ascontiguousarray(gather, np.int32),
        out,
        n,
        h,
        w,
        *norm.mean255,
        *norm.inv_std255,
        erase,
    )
    if dtype == torch.float16:
        out = half_bits_to_float(out)
    elif dtype == torch.bfloat16:
        out = bf16_bits_to_float(out)
    return out.transpose(0, 3, 1, 2) if channels_last else out


# (n_src, H, W, n): 1x1, widths that are and are not a multiple of the 4-pixel vector width, N = 1
CASES = [
    (1, 1, 1, 1),
    (1, 7, 5, 1),
    (4, 13, 17, 3),
    (5, 32, 24, 5),
    (3, 1, 31, 2),
    (6, 19, 1, 6),
    (8, 33, 35, 7),
    (3, 6, 8, 3),
    (2, 9, 4, 1),
    (4, 11, 30, 4),
]


@pytest.mark.parametrize("dtype", list(OUTPUT_TYPES))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "n%d_%dx%d_src%d" % (c[3], c[1], c[2], c[0]))
def test_shim_matches_float64_reference(shim, dtype, channels_last, case):
    n_src, h, w, n = case
    n_src = max(n_src, n)
    rng = np.random.default_rng(stable_seed(h, w, n, str(dtype), channels_last))
    norm = Normalization(mean=rng.uniform(0.3, 0.6, 3), std=rng.uniform(0.15, 0.35, 3))
    for _ in range(3):
        images = rng.integers(0, 256, (n_src, h, w, 3), dtype=np.uint8)
        records, pool = random_records(rng, n, n_src, h, w)
        got = run_shim(shim, images, records, pool, norm, dtype, channels_last)
        ref = reference_mix_normalize(images, records, pool, norm.mean, norm.std)
        err = np.abs(got.astype(np.float64) - ref)
        bad = err > ulp_tolerance(ref, dtype, norm)
        assert not bad.any(), f"{bad.sum()} values off, worst {err.max()} (methods {records['method'].tolist()})"


def test_shim_grid_stride_and_launch_shapes(shim):
    """Any grid covers the whole batch: one block of one thread, or more threads than pixels."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 9, 11, 3), dtype=np.uint8)
    records, pool = random_records(rng, 3, 3, 9, 11)
    norm = Normalization()
    ref = reference_mix_normalize(images, records, pool, norm.mean, norm.std)
    for grid, block in [
        (1, 1),
        (1, 7),
        (50, 256),
        ((1, 2, 1), (2, 3, 1)),
        ((3, 1, 2), (1, 1, 1)),
        ((1, 5, 7), (4, 2, 1)),
    ]:
        got = run_shim(shim, images, records, pool, norm, torch.float32, False, grid=grid, block=block)
        np.testing.assert_allclose(got, ref, atol=1e-5)


def test_unmixed_records_only_normalize(shim):
    """identity records: out = (x - 255 mean) / (255 std), the plain normalise + cast path."""
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    norm = Normalization()
    got = run_shim(shim, images, identity_records(4), np.zeros(1, np.float32), norm, torch.float32, False)
    ref = (images.astype(np.float64) / 255 - np.array(norm.mean)) / np.array(norm.std)
    np.testing.assert_allclose(got, ref.transpose(0, 3, 1, 2), atol=2e-6)


# ----------------------------------------------------------------------------------- flips
@pytest.mark.parametrize("dtype", list(OUTPUT_TYPES))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "n%d_%dx%d_src%d" % (c[3], c[1], c[2], c[0]))
def test_shim_flips_match_float64_reference(shim, dtype, channels_last, case):
    """Flip flags on every method: the kernel equals "flip each source image, then mix" in float64."""
    n_src, h, w, n = case
    n_src = max(n_src, n)
    rng = np.random.default_rng(stable_seed("flip", h, w, n, str(dtype), channels_last))
    norm = Normalization(mean=rng.uniform(0.3, 0.6, 3), std=rng.uniform(0.15, 0.35, 3))
    for _ in range(3):
        images = rng.integers(0, 256, (n_src, h, w, 3), dtype=np.uint8)
        records, pool = random_records(rng, n, n_src, h, w)
        set_flips(records, rng.random(n_src) < 0.5)
        got = run_shim(shim, images, records, pool, norm, dtype, channels_last)
        ref = reference_mix_normalize(images, records, pool, norm.mean, norm.std)
        err = np.abs(got.astype(np.float64) - ref)
        bad = err > ulp_tolerance(ref, dtype, norm)
        assert not bad.any(), f"{bad.sum()} values off, worst {err.max()} (flags {records['flags'].tolist()})"


def test_set_flips_marks_self_and_partner():
    rec = identity_records(4)
    rec["partner"] = [2, 0, 3, 3]
    rec["flags"] = [FLAG_BILINEAR, 0, FLAG_FLIP_SELF | FLAG_FLIP_PARTNER, 0]
    set_flips(rec, np.array([True, False, False, True, True]))  # one more source image than records
    assert rec["flags"].tolist() == [
        FLAG_BILINEAR | FLAG_FLIP_SELF,
        FLAG_FLIP_PARTNER,
        FLAG_FLIP_PARTNER,
        FLAG_FLIP_SELF | FLAG_FLIP_PARTNER,
    ]
    with pytest.raises(ValueError, match="one per source image"):
        set_flips(rec, np.array([True, False]))
    with pytest.raises(ValueError, match="1-D bool array"):
        set_flips(rec, np.ones((4, 1), bool))


def test_shim_flip_is_a_mirror_and_the_box_stays_put(shim):
    """Independent of the reference: flipping reads columns w-1-x; a CutMix box is where the record says."""
    rng = np.random.default_rng(9)
    images = rng.integers(0, 256, (2, 6, 9, 3), dtype=np.uint8)
    norm = Normalization(mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255))  # out = x
    rec = identity_records(2)
    set_flips(rec, np.array([True, False]))
    got = run_shim(shim, images, rec, np.zeros(1, np.float32), norm, torch.float32, False)
    np.testing.assert_array_equal(got[0], images[0, :, ::-1].transpose(2, 0, 1))
    np.testing.assert_array_equal(got[1], images[1].transpose(2, 0, 1))
    rec = identity_records(1)
    rec["method"], rec["partner"], rec["y0"], rec["x0"], rec["y1"], rec["x1"] = 2, 1, 1, 0, 4, 3
    set_flips(rec, np.array([False, True]))
    got = run_shim(shim, images, rec, np.zeros(1, np.float32), norm, torch.float32, True)[0].transpose(1, 2, 0)
    want = images[0].astype(np.float32).copy()
    want[1:4, 0:3] = images[1, 1:4, ::-1][:, 0:3]  # the left 3 columns of the mirrored partner
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", list(OUTPUT_TYPES))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_shim_vector_and_scalar_paths_agree_bit_for_bit(shim, dtype, channels_last):
    """Widths that are a multiple of 4 take the wide-load/store path; a misaligned output forces the
    pixel-by-pixel path on the same input: both give the same bits, flips included."""
    rng = np.random.default_rng(stable_seed("vec", str(dtype), channels_last))
    norm = Normalization()
    for _ in range(4):
        images = rng.integers(0, 256, (6, 10, 16, 3), dtype=np.uint8)
        records, pool = random_records(rng, 6, 6, 10, 16)
        set_flips(records, rng.random(6) < 0.5)
        vec = run_shim(shim, images, records, pool, norm, dtype, channels_last)
        scalar = run_shim(shim, images, records, pool, norm, dtype, channels_last, misalign=True)
        np.testing.assert_array_equal(vec, scalar)


def test_launch_config_covers_rows_and_samples():
    (gx, gy, gz), (bx, by, bz) = launch_config(256, 224, 224, sms=132)
    assert bx * by * bz <= 256 and gz == 256 and gx * bx * 4 >= 224 and gy * by >= 224 // 4
    (gx, gy, gz), (bx, by, _) = launch_config(1, 224, 224, sms=132)
    assert gy * by == 224  # one row per thread when the batch is too small to fill the GPU
    assert launch_config(70000, 2, 3)[0][2] == 65535  # the rest are walked grid-stride
    assert launch_config(1, 1, 5000)[1][0] == 256 and launch_config(1, 1, 5000)[0][0] == 5


def _ptx_functions(ptx: str) -> dict[str, str]:
    """Entry name -> its PTX body (from `.entry NAME(` to the next `.entry` or the end)."""
    parts = re.split(r"\.visible \.entry (\w+)\(", ptx)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH (install the CUDA toolkit to read the PTX)")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_ptx_has_no_64_bit_division_and_uses_hardware_half_conversion(tmp_path, arch):
    """Index math inside a sample is 32-bit: no div/rem.{s,u}64 in any mixing entry; fp16/bf16 use
    the hardware cvt.rn.{f16x2,bf16x2}.f32; the wide path uses 16-byte (fp32) / 8-byte (16-bit) stores."""
    ptx = tmp_path / "k.ptx"
    cmd = [NVCC, "-ptx", f"-arch={arch}", f"-I{kernel_dir()}", str(kernel_dir() / "mix_normalize.cu"), "-o", str(ptx)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    funcs = _ptx_functions(ptx.read_text())
    assert sorted(funcs) == sorted(ENTRIES)
    for name, body in funcs.items():
        wide = re.findall(r"\b(?:div|rem)\.(?:s|u)64\b", body)
        assert not wide, f"{name}: {len(wide)} 64-bit div/rem in the PTX"
        assert "__shared__" not in body and "bar.sync" not in body
        if "_f16_" in name:
            assert "cvt.rn.f16x2.f32" in body, name
        if "_bf16_" in name:
            assert "cvt.rn.bf16x2.f32" in body, name
        store = "st.global.v4.u32" if "_f32_" in name else "st.global.v2.u32"
        assert store in body, f"{name}: no {store} (wide stores)"


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
def test_bench_sass_counter_finds_the_vector_main_loop(tmp_path):
    """benchmarks/bench_mix.py's SASS count: for the MixUp loop it finds the wide-store loop, 4
    pixels per path, and an instruction count (the figure itself is reported, not asserted)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_mix

    cuobjdump = bench_mix.find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or triton)")
    funcs = bench_mix._compile_sass(
        kernel_dir(), "mix_normalize.cu", {"DM_SASS_KIND": "DMK_BLEND"}, "sm_90", cuobjdump, tmp_path
    )
    assert sorted(funcs) == sorted(ENTRIES)
    for name, code in funcs.items():
        cost = bench_mix.main_loop_cost(code, 4 if "_f32_" in name else 2)
        assert cost.get("pixels_per_path") == 4 and cost["paths"] == 1 and cost["per_pixel"] > 0, (name, cost)


def test_entry_mask_bits_follow_the_entries_order():
    """The CUDA backend compiles entry i alone with -DDM_ENTRY_MASK=1<<i (i = its place in ENTRIES)."""
    text = kernel_source("mix_normalize.cu")
    bits = re.findall(r"#if DM_ENTRY_MASK & (\d+)\nDM_MIX_NORMALIZE_ENTRY\((\w+),", text)
    assert [(int(b), name) for b, name in bits] == [(1 << i, name) for i, name in enumerate(ENTRIES)]
