"""timm's training loop with dalimix in place of timm's create_loader + Mixup.

What changes against timm's train.py: `from dalimix import create_loader` instead of timm's (same
argument names), the timm `Mixup` is handed to the loader (`mix=`) instead of being applied to each
batch, and `--mixup-off-epoch` sets `loader_train.mixup_enabled = False` (as timm does with its
prefetcher). The loss is timm's SoftTargetCrossEntropy (or --loss dalimix: dalimix's
MixCrossEntropy on compact targets). Runs under torchrun too (DDP). Tiny CPU run on the demo data:

    python examples/train_timm.py --model resnet18 --img-size 64 -b 16 --epochs 2 --steps 5 --mixup-off-epoch 1
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
from timm import create_model
from timm.data import Mixup, create_dataset, resolve_data_config
from timm.loss import SoftTargetCrossEntropy

from dalimix import create_loader
from dalimix.demo_data import demo_dataset
from dalimix.losses import MixCrossEntropy


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", help="folder with train/ and validation/ (or one ImageFolder); default: demo data")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="validation")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("-b", "--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps", type=int, default=0, help="stop each epoch after this many steps (0: whole epoch)")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--mixup", type=float, default=0.8)
    p.add_argument("--cutmix", type=float, default=1.0)
    p.add_argument("--cutmix-minmax", type=float, nargs=2, default=None)
    p.add_argument("--mixup-prob", type=float, default=1.0)
    p.add_argument("--mixup-switch-prob", type=float, default=0.5)
    p.add_argument("--mixup-mode", default="batch")
    p.add_argument("--mixup-off-epoch", type=int, default=0)
    p.add_argument("--smoothing", type=float, default=0.1)
    p.add_argument("--loss", choices=["timm", "dalimix"], default="timm")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    rank = dist.get_rank() if distributed else 0
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    data_dir = args.data_dir or str(demo_dataset(progress=rank == 0))

    dataset_train = create_dataset("", root=data_dir, split=args.train_split, is_training=True)
    dataset_eval = create_dataset("", root=data_dir, split=args.val_split, is_training=False)
    num_classes = len(dataset_train.reader.class_to_idx)
    model = create_model(args.model, num_classes=num_classes).to(device)
    data_config = resolve_data_config(vars(args), model=model, verbose=rank == 0)
    if args.img_size:
        data_config["input_size"] = (3, args.img_size, args.img_size)

    mixup_fn = None
    mixup_active = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if mixup_active:
        mixup_fn = Mixup(
            mixup_alpha=args.mixup,
            cutmix_alpha=args.cutmix,
            cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob,
            switch_prob=args.mixup_switch_prob,
            mode=args.mixup_mode,
            label_smoothing=args.smoothing,
            num_classes=num_classes,
        )
    compact = args.loss == "dalimix"
    if compact and mixup_fn is not None:
        from dalimix.mix import Mixup as DalimixMixup  # compact (y_a, y_b, lam) targets for MixCrossEntropy

        mixup_fn = DalimixMixup(
            mixup_alpha=args.mixup,
            cutmix_alpha=args.cutmix,
            cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob,
            switch_prob=args.mixup_switch_prob,
            mode=args.mixup_mode,
            label_smoothing=args.smoothing,
            targets="compact",
        )
    loader_train = create_loader(
        dataset_train,
        input_size=data_config["input_size"],
        batch_size=args.batch_size,
        is_training=True,
        interpolation=data_config["interpolation"],
        mean=data_config["mean"],
        std=data_config["std"],
        num_workers=args.workers,
        distributed=distributed,
        device=device,
        color_jitter=0,
        mix=mixup_fn,
        seed=args.seed,
    )
    loader_eval = create_loader(
        dataset_eval,
        input_size=data_config["input_size"],
        batch_size=args.batch_size,
        is_training=False,
        interpolation=data_config["interpolation"],
        mean=data_config["mean"],
        std=data_config["std"],
        num_workers=args.workers,
        distributed=distributed,
        crop_pct=data_config["crop_pct"],
        device=device,
    )
    if mixup_fn is None:
        train_loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=args.smoothing)
    else:
        train_loss_fn = MixCrossEntropy() if compact else SoftTargetCrossEntropy()
    train_loss_fn = train_loss_fn.to(device)

    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=2e-5)
    for epoch in range(args.epochs):
        if hasattr(loader_train.sampler, "set_epoch"):
            loader_train.sampler.set_epoch(epoch)
        if mixup_active and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            loader_train.mixup_enabled = False  # timm's --mixup-off-epoch
        model.train()
        t0, seen = time.perf_counter(), 0
        for step, (images, targets) in enumerate(loader_train):
            loss = train_loss_fn(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += images.shape[0]
            if args.steps and step + 1 >= args.steps:
                break
        correct, total = validate(model, loader_eval, device, args.steps)
        if rank == 0:
            print(
                f"epoch {epoch}: loss {loss.item():.4f}, mixing {'on' if loader_train.mixup_enabled else 'off'}, "
                f"{seen / (time.perf_counter() - t0):.1f} images/s per rank, eval top-1 {100 * correct / max(total, 1):.1f}% "
                f"of {total} images"
            )
    if distributed:
        dist.destroy_process_group()
    return 0


@torch.no_grad()
def validate(model, loader, device, max_steps=0):
    """Top-1 over the whole eval set: every rank counts its own samples (PARTIAL: each sample on exactly
    one rank), then one all_reduce adds the counts."""
    model.eval()
    counts = torch.zeros(2, dtype=torch.int64, device=device)
    for step, (images, labels) in enumerate(loader):
        counts[0] += (model(images).argmax(1) == labels).sum()
        counts[1] += labels.numel()
        if max_steps and step + 1 >= max_steps:
            break
    if dist.is_initialized():
        dist.all_reduce(counts)
    return int(counts[0]), int(counts[1])


if __name__ == "__main__":
    raise SystemExit(main())
