"""A non-editable install into a fresh virtual environment finds and loads the kernels."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fresh_install(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("install")
    wheels = tmp / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(REPO),
        ],
        check=True,
        cwd=tmp,
    )
    (wheel,) = wheels.glob("dalimix-*.whl")
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # the heavy dependencies (torch, DALI, ...) come from the test environment, dalimix from the wheel only
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--quiet", "--no-deps", str(wheel)],
        check=True,
        cwd=tmp,
    )
    return py, site, wheel, tmp


def test_wheel_carries_the_kernels(fresh_install):
    import zipfile

    _, _, wheel, _ = fresh_install
    names = zipfile.ZipFile(wheel).namelist()
    for f in (REPO / "kernels").iterdir():
        if f.suffix in (".cu", ".cuh", ".cpp"):
            assert f"dalimix/kernels/{f.name}" in names


def test_installed_package_loads_its_kernels(fresh_install):
    py, site, _, tmp = fresh_install
    script = """
import numpy as np, dalimix, dalimix.ops.kernels as k
from dalimix.testing.hostshim import HostShim
from dalimix.ops import Normalization
from dalimix.ops.record import identity_records
print(dalimix.__file__)
print(k.kernel_dir())
shim = HostShim()
img = np.full((1, 2, 2, 3), 255, np.uint8)
out = np.zeros((1, 3, 2, 2), np.float32)
n = Normalization(mean=(0, 0, 0), std=(1, 1, 1))
shim.launch("dalimix_mix_normalize_f32_nchw", 1, 32, img, identity_records(1), np.zeros(1, np.float32), np.zeros(1, np.int32), out, 1, 2, 2, *n.mean255, *n.inv_std255, None)
print(out.min(), out.max())
from dalimix.ops import host, mix_normalize
import torch
assert host.available()
print(float(mix_normalize(torch.full((1, 2, 2, 3), 255, dtype=torch.uint8), norm=n).min()))
"""
    res = subprocess.run([str(py), "-c", script], capture_output=True, text=True, cwd=tmp)
    assert res.returncode == 0, res.stderr
    pkg, kdir, values, host_value = res.stdout.strip().splitlines()
    assert pkg.startswith(str(site)) and kdir.startswith(str(site))
    assert values == "1.0 1.0" and host_value == "1.0"  # the shim and the host backend, from the installed sources


def test_console_script(fresh_install):
    py, _, _, tmp = fresh_install
    res = subprocess.run([str(py.parent / "dalimix"), "--help"], capture_output=True, text=True, cwd=tmp)
    assert res.returncode == 0 and "demo" in res.stdout
