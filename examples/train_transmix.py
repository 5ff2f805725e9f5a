"""Train a small timm ViT with TransMix on the demo data set: the loader mixes MixUp/CutMix batches
in its fused kernel; for CutMix batches the labels are re-weighted by the class token's attention
on the box, read from the same forward pass.

    python examples/train_transmix.py                    # ~200 steps, 64 px, CPU: a couple of minutes on 2 cores
    python examples/train_transmix.py --no-transmix      # the same run with area-based CutMix labels
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from train_automix import accuracy  # examples/train_automix.py, next to this script

from dalimix import ImageLoader
from dalimix.demo_data import demo_dataset
from dalimix.losses import MixCrossEntropy
from dalimix.mix import Mixup
from dalimix.ops.record import METHOD_BOX
from dalimix.transmix import ClsAttention, transmix_lam, transmix_targets


def small_vit(num_classes: int, size: int):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=size, patch_size=8, embed_dim=96, depth=4, num_heads=3, mlp_ratio=2.0, num_classes=num_classes
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="ImageFolder root (default: the demo data set)")
    p.add_argument("--device", default=None)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (cosine decay)")
    p.add_argument("--smoothing", type=float, default=0.1)
    p.add_argument("--no-transmix", action="store_true", help="keep the area-based CutMix labels")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    root = args.data or demo_dataset(progress=True)

    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, mode="batch", label_smoothing=args.smoothing)
    loader = ImageLoader(
        root=root,
        batch_size=args.batch_size,
        size=args.size,
        device=args.device,
        seed=args.seed,
        mix=mix,
        last_batch_policy="drop",
    )
    evaluation = ImageLoader(root=root, batch_size=args.batch_size, size=args.size, device=loader.device, train=False)
    vit = small_vit(loader.num_classes, args.size).to(loader.device)
    attention = ClsAttention(vit)
    opt = torch.optim.AdamW(vit.parameters(), lr=args.lr, weight_decay=0.05)
    criterion = MixCrossEntropy()
    print(
        f"{'TransMix' if not args.no_transmix else 'CutMix/MixUp'}: ViT {sum(q.numel() for q in vit.parameters()) / 1e6:.2f} M "
        f"parameters, {attention.grid[0]}x{attention.grid[1]} patches, {len(loader)} batches/epoch on {loader.device}"
    )

    step, start, shifts, losses = 0, time.time(), [], []
    while step < args.steps:
        for images, targets in loader:
            with attention:
                logits = vit(images)
            info = loader.last_batch
            if (info.params.method == METHOD_BOX).any():
                lam = transmix_lam(
                    info.params, attention.attention, height=args.size, width=args.size, grid=attention.grid
                )
                shifts.append(float((lam - info.params.target_lam_tensor(lam.device)).abs().mean()))
                if not args.no_transmix:
                    targets = transmix_targets(
                        info.labels,
                        info.params,
                        attention.attention,
                        num_classes=loader.num_classes,
                        height=args.size,
                        width=args.size,
                        grid=attention.grid,
                        smoothing=args.smoothing,
                    )
            loss = criterion(logits, targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for g in opt.param_groups:
                g["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * (step + 1) / args.steps))
            losses.append(float(loss.detach()))
            if step % 25 == 0 or step == args.steps - 1:
                shift = f"{np.mean(shifts[-10:]):.3f}" if shifts else "-"
                print(
                    f"step {step:4d}  loss {np.mean(losses[-25:]):.3f}  |TransMix lam - area lam| on CutMix batches {shift}  "
                    f"{time.time() - start:.0f} s",
                    flush=True,
                )
            step += 1
            if step >= args.steps:
                break
    loader.close()
    print(
        f"clean-image accuracy on the data set: {accuracy(vit, evaluation):.3f}; {args.steps} steps in {time.time() - start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
