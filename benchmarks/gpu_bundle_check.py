"""Check that the DALI bundle of ``benchmarks/gpu_bundle.sh`` loads and decodes: run with the bundle
on PYTHONPATH. Decodes one JPEG, PNG, WebP and TIFF image with DALI's CPU decoder (and with the
"mixed" GPU decoder when ``--gpu``), compares each with the pixels it was made from, and checks
that ``nvidia`` stays a namespace package (torch's and CuPy's ``nvidia.*`` stay importable).

Usage: PYTHONPATH=BUNDLE python gpu_bundle_check.py [--images DIR] [--gpu]
``--images``: a folder with x.jpg, x.png, x.webp, x.tif made from ``pixels.npy`` (else they are
made here with Pillow).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "tif": "TIFF"}


def make_images(folder: Path) -> np.ndarray:
    from PIL import Image

    y, x = np.mgrid[0:48, 0:64]  # smooth colour ramps: lossy codecs keep them within a few levels
    pixels = np.stack([x * 4, y * 5, 255 - x * 2 - y * 2], axis=-1).clip(0, 255).astype(np.uint8)
    for ext, fmt in FORMATS.items():
        Image.fromarray(pixels).save(folder / f"x.{ext}", format=fmt)
    np.save(folder / "pixels.npy", pixels)
    return pixels


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=Path)
    ap.add_argument("--gpu", action="store_true")
    args = ap.parse_args(argv)
    import nvidia
    import nvidia.dali as dali
    from nvidia.dali import fn, pipeline_def, types

    homes = [str(Path(entry) / "nvidia") for entry in sys.path if entry and (Path(entry) / "nvidia").is_dir()]
    if getattr(nvidia, "__file__", None) is not None and len(homes) > 1:
        print(f"FAIL: nvidia is a regular package ({nvidia.__file__}): it hides the nvidia.* packages of {homes[1:]}")
        return 1
    print(f"DALI {dali.__version__} from {Path(dali.__file__).parent}; nvidia namespace: {list(nvidia.__path__)}")
    folder = args.images or Path(tempfile.mkdtemp(prefix="dalimix-bundle-"))
    pixels = np.load(folder / "pixels.npy") if args.images else make_images(folder)
    files = [str(folder / f"x.{ext}") for ext in FORMATS]
    failed = 0
    for device in ["cpu"] + (["mixed"] if args.gpu else []):

        @pipeline_def(batch_size=len(files), num_threads=1, device_id=0 if device == "mixed" else None)
        def pipe():
            data, _ = fn.readers.file(files=files, labels=list(range(len(files))))
            return fn.decoders.image(data, device=device, output_type=types.RGB)  # noqa: B023 (built and run in this iteration)

        p = pipe()
        p.build()
        (out,) = p.run()
        if device == "mixed":
            out = out.as_cpu()
        for ext, i in zip(FORMATS, range(len(files))):
            img = np.asarray(out.at(i))
            err = np.abs(img.astype(np.int32) - pixels).mean() if img.shape == pixels.shape else float("inf")
            ok = err < (6 if ext in ("jpg", "webp") else 0.5)  # lossy JPEG / WebP at default quality
            failed += not ok
            print(f"{device:5s} {ext:4s} shape {img.shape} mean |error| {err:.2f} {'ok' if ok else 'FAIL'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
