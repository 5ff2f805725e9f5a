"""Train a small CNN with AutoMix on the demo data set: the loader mixes every batch with the Mix
Block's mask through the mask hook, in its fused kernel.

    python examples/train_automix.py                      # ~300 steps, 64 px, CPU: a few minutes on 2 cores
    python examples/train_automix.py --device cuda --steps 2000 --size 128
    python examples/train_automix.py --model resnet18     # any torchvision/timm CNN, --feature-layer to choose

Prints the losses and the masks' spatial standard deviation (0 = a constant mask, i.e. plain
MixUp; it grows as the Mix Block learns where to mix), the accuracy of the model and of its EMA on
clean images, and writes a PNG of masks and mixed images at several points of training.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from torch import nn

from dalimix import ImageLoader
from dalimix.automix import AutoMix, MixBlock, mask_spatial_std
from dalimix.demo_data import demo_dataset
from dalimix.ops.record import METHOD_MASK
from dalimix.viz import denormalize, save_grid


def small_cnn(num_classes: int) -> nn.Module:
    """Four stride-2 stages (16, 32, 64, 96 channels): ``layer3`` is 1/8 of the input (8 x 8 at 64 px)."""

    def stage(cin, cout):
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, 2, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    net = nn.Sequential()
    net.add_module("layer1", stage(3, 16))
    net.add_module("layer2", stage(16, 32))
    net.add_module("layer3", stage(32, 64))
    net.add_module("layer4", stage(64, 96))
    net.add_module("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    net.add_module("fc", nn.Linear(96, num_classes))
    return net


def build_model(name: str, num_classes: int) -> nn.Module:
    if name == "small":
        return small_cnn(num_classes)
    try:
        import torchvision

        return getattr(torchvision.models, name)(num_classes=num_classes)
    except AttributeError:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes)


def accuracy(model: nn.Module, loader: ImageLoader) -> float:
    was = model.training
    model.eval()
    right = total = 0
    with torch.no_grad():
        for images, labels in loader:
            right += int((model(images).argmax(1) == labels).sum())
            total += len(labels)
    model.train(was)
    return right / max(total, 1)


def snapshot_tiles(images, info, logits, norm, samples: int) -> list:
    """Own image, partner, mask (white = own image), mixed image of the first ``samples`` samples."""
    clean = denormalize(info.unmixed[:samples], norm)
    partner = denormalize(info.unmixed[torch.from_numpy(info.params.partner[:samples])], norm)
    mixed = denormalize(images[:samples], norm)
    mask = MixBlock.mask(logits[:samples].float(), images.shape[-2:])
    mask = (mask.cpu().clamp(0, 1) * 255 + 0.5).to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()
    tiles = []
    for i in range(samples):
        tiles += [clean[i], partner[i], mask[i], mixed[i]]
    return tiles


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="ImageFolder root (default: the demo data set)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--model", default="small", help="'small' (default), or a torchvision/timm model name, e.g. resnet18"
    )
    p.add_argument("--feature-layer", default="layer3", help="the Mix Block's input (default: layer3, stage 3)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate of the model (cosine decay)")
    p.add_argument("--mix-block-lr", type=float, default=0.5, help="SGD learning rate of the Mix Block (cosine decay)")
    p.add_argument(
        "--momentum",
        type=float,
        default=0.9,
        help="EMA momentum at the start, rising by a cosine to 0.99999 (the paper's 0.999 suits long runs)",
    )
    p.add_argument("--min-scale", type=float, default=0.35, help="random resized crop: smallest area fraction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="automix-masks.png")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    root = args.data or demo_dataset(progress=True)

    probe = ImageLoader(root=root, batch_size=args.batch_size, size=args.size, device=args.device, train=False)
    num_classes, device = probe.num_classes, probe.device
    model = build_model(args.model, num_classes).to(device)
    automix = AutoMix(
        model=model,
        feature_layer=args.feature_layer,
        input_size=args.size,
        alpha=2.0,
        momentum=args.momentum,
        seed=args.seed,
    ).to(device)
    loader = ImageLoader(
        root=root,
        batch_size=args.batch_size,
        size=args.size,
        device=device,
        seed=args.seed,
        scale=(args.min_scale, 1.0),
        mix=automix.mixer(),
        last_batch_policy="drop",
    )
    automix.attach(loader)
    opt = torch.optim.SGD(
        [
            {"params": automix.model.parameters(), "lr": args.lr, "weight_decay": 5e-4},
            {"params": automix.mix_block.parameters(), "lr": args.mix_block_lr},
        ],
        momentum=0.9,
        nesterov=True,
    )
    base_lrs = [g["lr"] for g in opt.param_groups]
    print(
        f"AutoMix: {args.model} ({sum(q.numel() for q in model.parameters()) / 1e6:.2f} M parameters), feature layer "
        f"{args.feature_layer} -> Mix Block on {automix.mix_block.in_channels} channels; {len(loader)} batches/epoch "
        f"of {args.batch_size} x {args.size} px on {device}"
    )

    checkpoints = sorted({0, args.steps // 3, 2 * args.steps // 3, max(args.steps - 10, 0)})
    tiles, captions, history = [], [], []
    step, start = 0, time.time()
    while step < args.steps:
        for images, targets in loader:
            info = loader.last_batch
            losses = automix(images, targets, info)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            losses["loss"] = losses["loss"].detach()
            opt.step()
            progress = (step + 1) / args.steps
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * progress))
            automix.update(progress)
            std = float(mask_spatial_std(automix.last_hook_logits))
            history.append({k: float(v) for k, v in losses.items()} | {"hook_mask_std": std})
            masked = bool((info.params.method == METHOD_MASK).all())  # not a MixUp fallback batch (lam near 0 or 1)
            if checkpoints and step >= checkpoints[0] and (masked or step == args.steps - 1):
                checkpoints.pop(0)
                n = min(3, len(images))
                tiles += snapshot_tiles(images, info, automix.last_hook_logits, loader.norm, n)
                lam = float(info.params.lam[0])
                for i in range(n):
                    captions += [
                        f"step {step} lam {lam:.2f}" if i == 0 else "",
                        "partner",
                        (f"std {std:.3f}" if masked else "MixUp batch") if i == 0 else "",
                        "mixed",
                    ]
            if step % 25 == 0 or step == args.steps - 1:
                h = history[-25:]
                mean = {k: np.mean([r[k] for r in h]) for k in h[0]}
                print(
                    f"step {step:4d}  loss {mean['loss']:.3f} (mix {mean['loss_mix']:.3f}, clean {mean['loss_clean']:.3f}, "
                    f"mix block {mean['loss_mix_block']:.3f}, mask {mean['loss_mask']:.4f})  mask std {mean['hook_mask_std']:.4f}  "
                    f"momentum {automix.momentum:.5f}  {time.time() - start:.0f} s",
                    flush=True,
                )
            step += 1
            if step >= args.steps:
                break
    loader.close()

    first = np.mean([r["hook_mask_std"] for r in history[:10]])
    last = np.mean([r["hook_mask_std"] for r in history[-10:]])
    print(
        f"mask spatial std: {first:.4f} over the first 10 steps -> {last:.4f} over the last 10 "
        f"({'moved away from a constant mask' if last > 4 * max(first, 1e-3) else 'still close to constant'})"
    )
    print(
        f"clean-image accuracy on the data set: model {accuracy(automix.model, probe):.3f}, EMA {accuracy(automix.ema, probe):.3f}"
    )
    grid = np.stack(tiles)
    zoom = max(1, 128 // args.size)
    grid = grid.repeat(zoom, axis=1).repeat(zoom, axis=2)
    path = save_grid(grid, args.out, captions=captions, cols=12, max_tiles=len(tiles))
    print(f"masks and mixed images over training (own | partner | mask, white = own | mixed): {path.resolve()}")
    print(f"{args.steps} steps in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
