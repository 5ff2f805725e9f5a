"""Train a torchvision ResNet-18 on an ImageFolder with a plain PyTorch loop.

train_plain_torchvision.py feeds it with torchvision's DataLoader and v2 MixUp/CutMix,
train_plain.py with dalimix; `diff -u train_plain_torchvision.py train_plain.py` is the whole
change. Both run on the demo data set when --data is not given; a tiny CPU run:

    python examples/train_plain.py --size 64 --steps 20 --batch-size 16
    python examples/train_plain_torchvision.py --size 64 --steps 20 --batch-size 16
"""

import argparse
import time

import torch
import torchvision
from torch import nn

from dalimix import ImageLoader
from dalimix.demo_data import demo_dataset
from dalimix.mix import Mixup

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="ImageFolder root (default: the demo data set)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=0, help="stop each epoch after this many steps (0: whole epoch)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    root = args.data or demo_dataset(progress=True)
    torch.manual_seed(0)

    mix = Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, label_smoothing=0.0)
    loader = ImageLoader(root=root, batch_size=args.batch_size, size=args.size, mean=MEAN, std=STD,
                         last_batch_policy="drop", num_threads=args.workers, device=device, mix=mix)
    num_classes = len(loader.classes)

    model = torchvision.models.resnet18(num_classes=num_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-5)
    criterion = nn.CrossEntropyLoss()  # takes the N x C soft targets of the mixed batch
    for epoch in range(args.epochs):
        model.train()
        seen, t0 = 0, time.perf_counter()
        for step, (images, targets) in enumerate(loader):
            loss = criterion(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += images.shape[0]
            if step % 10 == 0:
                print(f"epoch {epoch} step {step}: loss {loss.item():.4f}")
            if args.steps and step + 1 >= args.steps:
                break
        print(f"epoch {epoch}: {seen} images, {seen / (time.perf_counter() - t0):.1f} images/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
