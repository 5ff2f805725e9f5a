"""DistributedDataParallel training with dalimix under torchrun, with exact resume.

Each process (rank) reads its own shard of every epoch's permutation: ImageLoader takes rank and
world size from torch.distributed, and device "cuda" means cuda:LOCAL_RANK. Mixing partners are
drawn within each rank's batch. Checkpoints hold the model, the optimiser and every rank's loader
state, so --resume continues with exactly the batches the interrupted run would have seen.

    # one machine, 8 GPUs
    torchrun --nproc_per_node 8 examples/train_ddp.py --data /imagenet/train --batch-size 256
    # two machines, 8 GPUs each (run on both; --node_rank 0 on the first, 1 on the second)
    torchrun --nnodes 2 --nproc_per_node 8 --node_rank 0 --master_addr HOST0 --master_port 29500 \\
        examples/train_ddp.py --data /imagenet/train --batch-size 256
    # tiny CPU run (gloo): stop after 3 steps (as if it crashed), then resume
    torchrun --standalone --nproc_per_node 2 examples/train_ddp.py --device cpu --size 32 --batch-size 8 \\
        --save-at 3 --stop-at 3 --checkpoint /tmp/ddp.pt
    torchrun --standalone --nproc_per_node 2 examples/train_ddp.py --device cpu --size 32 --batch-size 8 \\
        --resume --checkpoint /tmp/ddp.pt
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
import torchvision
from torch.nn.parallel import DistributedDataParallel

from dalimix import ImageLoader
from dalimix.demo_data import demo_dataset
from dalimix.losses import MixCrossEntropy
from dalimix.mix import Mixup


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="ImageFolder root (default: the demo data set)")
    p.add_argument("--val-data", help="ImageFolder root for evaluation (default: --data)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", help="where to save (at the end of every epoch) and what --resume reads")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--save-at", type=int, default=0, help="save after this many steps in all, instead of every epoch")
    p.add_argument("--stop-at", type=int, default=0, help="exit after this many steps in all (as if the run crashed)")
    p.add_argument("--trace", help="write each rank's (epoch, step, sample ids, loss) lines to TRACE.rank<N>")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    root = args.data or str(demo_dataset(progress=rank == 0))

    # shard_id/num_shards come from torch.distributed; DROP: every rank runs the same number of steps
    train_loader = ImageLoader(
        root=root,
        batch_size=args.batch_size,
        size=args.size,
        device=device,
        seed=args.seed,
        mix=Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1),
        last_batch_policy="drop",
    )
    # PARTIAL + no shuffle: every evaluation sample exactly once over all ranks, no padding
    eval_loader = ImageLoader(
        root=args.val_data or root,
        batch_size=args.batch_size,
        size=args.size,
        device=device,
        train=False,
        last_batch_policy="partial",
    )
    model = torchvision.models.resnet18(num_classes=train_loader.num_classes).to(device)
    model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-5)
    criterion = MixCrossEntropy()

    start_epoch, global_step = 0, 0
    if args.resume:
        ckpt = torch.load(args.checkpoint, map_location=device)
        model.module.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        train_loader.load_state_dict(ckpt["loader"])  # the list of every rank's states: each takes its own
        start_epoch, global_step = ckpt["loader"][rank]["epoch"], ckpt["global_step"]
        if rank == 0:
            print(f"resumed at epoch {start_epoch}, step {ckpt['loader'][rank]['step']}")
    log = open(f"{args.trace}.rank{rank}", "a") if args.trace else None

    for epoch in range(start_epoch, args.epochs):
        train_loader.set_epoch(epoch)  # keeps a resumed position in this epoch
        model.train()
        t0, seen = time.perf_counter(), 0
        for images, targets in train_loader:
            loss = criterion(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += images.shape[0]
            global_step += 1
            info = train_loader.last_batch
            if log:
                log.write(
                    f"{info.epoch} {info.step} {' '.join(map(str, info.sample_ids.tolist()))} {loss.item():.6f}\n"
                )
            if global_step == args.save_at:
                save(args, model, optimizer, train_loader, global_step, rank)
            if global_step == args.stop_at:
                if rank == 0:
                    print(f"stopped after step {global_step} (epoch {info.epoch}, step {info.step})")
                dist.destroy_process_group()
                return 0
        correct, total = evaluate(model, eval_loader, device)
        if rank == 0:
            print(
                f"epoch {epoch}: loss {loss.item():.4f}, {seen * world / (time.perf_counter() - t0):.1f} images/s "
                f"over {world} ranks, eval top-1 {100 * correct / total:.1f}% of {total} images"
            )
        if not args.save_at:
            save(args, model, optimizer, train_loader, global_step, rank)
    dist.destroy_process_group()
    return 0


def save(args, model, optimizer, loader, global_step, rank):
    """One checkpoint for all ranks: the model once, every rank's loader state (they differ: each
    rank has its own shard and DALI random streams)."""
    if not args.checkpoint:
        return
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, loader.state_dict())
    if rank == 0:
        torch.save(
            {
                "model": model.module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "loader": states,
                "global_step": global_step,
            },
            args.checkpoint,
        )
    dist.barrier()


@torch.no_grad()
def evaluate(model, loader, device):
    """Each rank counts its own samples, one all_reduce adds them: with PARTIAL every sample counts once,
    and ranks whose share is a batch shorter simply finish earlier (no collective inside the loop)."""
    model.eval()
    counts = torch.zeros(2, dtype=torch.int64, device=device)
    for images, labels in loader:
        counts[0] += (model.module(images).argmax(1) == labels).sum()
        counts[1] += labels.numel()
    dist.all_reduce(counts)
    return int(counts[0]), int(counts[1])


if __name__ == "__main__":
    raise SystemExit(main())
