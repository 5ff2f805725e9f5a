"""One contender in its own process: ``python -m dalimix.bench.runner '<Config as JSON>'``.

Protocol (one JSON object per line on the original stdout; anything else the libraries print
goes to stderr): first ``{"ready": true, "pid": ..., "setup_s": ...}`` or ``{"error": "..."}``;
then for each ``epoch`` line read from stdin, one epoch's figures; ``quit`` ends it.

An epoch's figures: images, batches, wall seconds (from asking for the first batch to the last
batch done, GPU work included), CPU seconds of the process tree (process + DataLoader workers +
DALI threads), torch's peak reserved GPU memory, and the first batch's shape, dtype and device.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


def _batch_facts(images, targets) -> dict:
    return {
        "shape": list(images.shape),
        "dtype": str(images.dtype).replace("torch.", ""),
        "device": str(images.device),
        "targets_shape": list(targets.shape),
        "targets_dtype": str(targets.dtype).replace("torch.", ""),
        "finite": bool(images.isfinite().all()),
    }


def run_epoch(contender, cuda: bool) -> dict:
    import torch

    from .procstat import cpu_seconds

    pid = os.getpid()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    first = None
    images_seen = batches = 0
    cpu0 = cpu_seconds(pid)
    t0 = time.perf_counter()
    for images, targets in contender.epoch():
        if first is None:
            first = _batch_facts(images, targets)
        images_seen += int(images.shape[0])
        batches += 1
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(pid) - cpu0
    return {
        "images": images_seen,
        "batches": batches,
        "wall_s": wall,
        "cpu_s": cpu,
        "torch_gpu_peak_bytes": int(torch.cuda.max_memory_reserved()) if cuda else None,
        "first_batch": first,
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library chatter on stdout goes to stderr; replies keep their own pipe
    sys.stdout = sys.stderr

    def send(obj) -> None:
        reply.write(json.dumps(obj) + "\n")
        reply.flush()

    from .contenders import Config, build

    try:
        cfg = Config(**json.loads(argv[0]))
        t0 = time.perf_counter()
        contender = build(cfg)
        send({"ready": True, "pid": os.getpid(), "setup_s": time.perf_counter() - t0})
    except Exception as e:  # reported to the driver, which carries on with the others
        traceback.print_exc()
        send({"error": f"{type(e).__name__}: {e}"})
        return 1
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        if command != "epoch":
            send({"error": f"unknown command {command!r}"})
            continue
        try:
            send(run_epoch(contender, cfg.cuda))
        except Exception as e:
            traceback.print_exc()
            send({"error": f"{type(e).__name__}: {e}"})
            return 1
    contender.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
