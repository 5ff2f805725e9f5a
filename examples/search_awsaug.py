"""A small, honest AWS Auto-Aug search on the demo data set, on the CPU.

Tian et al., "Improving Auto-Augment via Augmentation-Wise Weight Sharing", NeurIPS 2020:

- Stage 1 trains a network under the shared policy (uniform over all sub-policies): the
  augmentation-wise shared weights.
- Stage 2 repeats: sample candidates from the current distribution ``p = softmax(theta)`` over
  sub-policies, fine-tune a copy of the shared weights for a few steps under each candidate,
  measure held-out accuracy, and move ``theta`` by policy gradient (REINFORCE with a moving-average
  baseline): ``theta += lr * mean_m (acc_m - baseline) * grad log p(candidate_m)``.

The loader is built once: each candidate switches its vector with ``policy.set_probs`` and the
very next batch uses it (checked here against ``loader.last_batch.extra["policy"]``).

What is scaled down so that it runs in a few minutes on 2 CPU cores: 12 hand-picked sub-policies
(the paper searches a far larger space of operation pairs); a 4-layer CNN at 48x48 px trained with
AdamW (the paper: WRN / ResNet at full size); JPEG copies of the demo images with the shorter side
at 96 px (decoding the 300-640 px originals every epoch would take most of the run); a held-out
split of 12 images per class (file lists) as the reward set; one sub-policy per candidate (its
log-probability is the candidate's); a few fine-tuning steps instead of the paper's last epochs.

What to expect: the demo set has 36 training images per class, too few for this CNN to generalise
much in a few minutes (held-out accuracy 0.15-0.2 after stage 1, against 0.125 chance), so the
rewards are noisy and the distribution moves little. The script prints the stage-1 accuracy, every
round's rewards and, at the end, each sub-policy's mean reward with its standard error, so you can
judge how much of the final distribution the data supports. It shows the mechanism (the loader
serving a distribution that changes between steps, per-sample reports for credit), not a tuned
policy; give it more rounds and candidates for more signal.

    python examples/search_awsaug.py                 # a few minutes on 2 cores, writes awsaug-search.png
    python examples/search_awsaug.py --rounds 30 --candidates 6
"""

from __future__ import annotations

import argparse
import copy
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dalimix import ImageLoader
from dalimix.demo_data import demo_dataset
from dalimix.policy import Policy
from dalimix.sources import scan_image_folder

SUB_POLICIES = [
    [("identity", 1.0, None)],
    [("hflip", 0.5, None), ("rotate", 0.5, 3)],
    [("rotate", 0.8, 6), ("equalize", 0.6, None)],
    [("shear_x", 0.6, 5), ("auto_contrast", 0.6, None)],
    [("color", 0.8, 2), ("contrast", 0.6, 7)],
    [("brightness", 0.8, 8), ("sharpness", 0.6, 8)],
    [("equalize", 0.8, None), ("shear_y", 0.6, 4)],
    [("translate_x", 1.0, 10), ("translate_y", 1.0, 10)],  # shifts by up to 45 %: often loses the object
    [("invert", 1.0, None)],
    [("solarize", 1.0, 1), ("posterize", 1.0, 0)],
    [("rotate", 1.0, 10), ("shear_x", 1.0, 10)],
    [("posterize", 0.8, 2), ("solarize_add", 0.6, 8)],
]


class SmallCNN(nn.Module):
    """Four 3x3 conv blocks (BN + ReLU, pooling), global average pooling, a linear classifier."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers = []
        for i in range(4):
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
            ]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def small_copies(root: Path, dest: Path, shorter_side: int) -> Path:
    """JPEG copies of the ImageFolder tree ``root`` with the shorter side resized to ``shorter_side``
    px (the loader's random resized crop then works on these): decoding 300-640 px JPEGs every
    epoch would take most of the run on 2 cores."""
    from PIL import Image

    for path in map(Path, scan_image_folder(root).paths):
        img = Image.open(path).convert("RGB")
        scale = shorter_side / min(img.size)
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR, reducing_gap=2.0
        )
        out = dest / path.parent.name / (path.stem + ".jpg")
        out.parent.mkdir(parents=True, exist_ok=True)
        img.save(out, quality=92)
    return dest


def split_file_lists(root: Path, out: Path, heldout_per_class: int, seed: int) -> tuple[Path, Path, list[str]]:
    """Write train.txt and heldout.txt ('path label' lines): ``heldout_per_class`` random images of
    each class are held out for the reward, the rest train."""
    samples = scan_image_folder(root)
    rng = np.random.default_rng(seed)
    train, held = [], []
    for label in range(len(samples.classes)):
        idx = np.flatnonzero(samples.labels == label)
        rng.shuffle(idx)
        held += [(samples.paths[i], label) for i in idx[:heldout_per_class]]
        train += [(samples.paths[i], label) for i in idx[heldout_per_class:]]
    paths = (out / "train.txt", out / "heldout.txt")
    for path, rows in zip(paths, (train, held)):
        path.write_text("".join(f"{p} {lab}\n" for p, lab in rows))
    return paths[0], paths[1], samples.classes


def endless(loader):
    """Batches across epochs, forever (the loader reshuffles each new epoch)."""
    while True:
        yield from loader


def train_steps(model, opt, batches, steps: int, loader=None, expect=None) -> None:
    model.train()
    for _ in range(steps):
        images, labels = next(batches)
        if expect is not None:  # every sample of the batch got the candidate's sub-policy
            got = loader.last_batch.extra["policy"].sub_policy
            assert (got == expect).all(), f"expected sub-policy {expect}, the loader applied {np.unique(got)}"
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@torch.no_grad()
def accuracy(model, images, labels) -> float:
    model.eval()
    return float((model(images).argmax(1) == labels).float().mean())


def plot(history: np.ndarray, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5))
    rounds = np.arange(len(history))
    ax.stackplot(
        rounds,
        history.T,
        labels=[f"{k}: {n}" for k, n in enumerate(names)],
        colors=plt.cm.tab20(np.linspace(0, 1, len(names))),
    )
    ax.set_xlim(0, len(history) - 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("search round (0 = uniform)")
    ax.set_ylabel("probability of the sub-policy")
    ax.set_title("AWS Auto-Aug on the dalimix demo data: the policy distribution over rounds")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> np.ndarray:
    """Run the search; returns the distribution after every round (rounds + 1 x K)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="ImageFolder root (default: the demo data set)")
    ap.add_argument("--size", type=int, default=48, help="training and held-out image size")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--stage1-epochs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=10, help="policy-gradient updates")
    ap.add_argument("--candidates", type=int, default=4, help="sampled candidates per round")
    ap.add_argument("--finetune-steps", type=int, default=6)
    ap.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate of stage 1 (fine-tuning: a third)")
    ap.add_argument("--policy-lr", type=float, default=10.0, help="REINFORCE step on the logits")
    ap.add_argument("--heldout-per-class", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="awsaug-search.png")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="awsaug-"))
    root = Path(args.data) if args.data else demo_dataset(progress=True)
    small = small_copies(root, work / "images", shorter_side=2 * args.size)
    train_list, held_list, classes = split_file_lists(small, work, args.heldout_per_class, args.seed)
    policy = Policy(sub_policies=SUB_POLICIES)  # uniform: stage 1's shared policy
    names = [policy.describe(k) for k in range(len(policy))]
    loader = ImageLoader(
        file_list=train_list,
        classes=classes,
        batch_size=args.batch_size,
        size=args.size,
        device="cpu",
        scale=(0.35, 1.0),
        auto_augment=policy,
        last_batch_policy="drop",
        seed=args.seed,
    )
    held = ImageLoader(
        file_list=held_list, classes=classes, batch_size=256, size=args.size, device="cpu", train=False, crop_pct=1.0
    )
    held_x, held_y = (torch.cat(t) for t in zip(*[(x, y) for x, y in held]))
    print(
        f"data: {len(loader.dataset)} training images, {len(held_y)} held out, {len(classes)} classes "
        f"(chance {1 / len(classes):.3f}), {args.size}x{args.size}; {len(policy)} sub-policies"
    )

    # ---- stage 1: augmentation-wise shared weights under the uniform policy
    shared = SmallCNN(len(classes))
    opt = torch.optim.AdamW(shared.parameters(), lr=args.lr, weight_decay=0.05)
    batches = endless(loader)
    for epoch in range(args.stage1_epochs):
        train_steps(shared, opt, batches, len(loader))
        if (epoch + 1) % 5 == 0 or epoch + 1 == args.stage1_epochs:
            print(
                f"stage 1 epoch {epoch + 1}/{args.stage1_epochs}: held-out accuracy "
                f"{accuracy(shared, held_x, held_y):.3f}  ({time.perf_counter() - t_start:.0f} s)"
            )

    # ---- stage 2: fine-tune copies under sampled candidates, REINFORCE on the logits
    theta = np.zeros(len(policy))
    rng = np.random.default_rng(args.seed)
    baseline = None
    history = [np.full(len(policy), 1 / len(policy))]
    seen: dict[int, list[float]] = {k: [] for k in range(len(policy))}
    for rnd in range(args.rounds):
        p = history[-1]
        picks = rng.choice(len(policy), size=args.candidates, p=p)
        rewards = []
        for k in picks:
            policy.set_probs(np.eye(len(policy))[k])  # the next batch is drawn from this vector
            model = copy.deepcopy(shared)
            opt = torch.optim.AdamW(model.parameters(), lr=args.lr / 3, weight_decay=0.05)
            train_steps(model, opt, batches, args.finetune_steps, loader=loader, expect=k)
            rewards.append(accuracy(model, held_x, held_y))
            seen[int(k)].append(rewards[-1])
        rewards = np.array(rewards)
        baseline = rewards.mean() if baseline is None else 0.8 * baseline + 0.2 * rewards.mean()
        grad = np.zeros(len(policy))
        for k, r in zip(picks, rewards):
            grad += (r - baseline) * (np.eye(len(policy))[k] - p)  # d log p_k / d theta = onehot(k) - p
        theta += args.policy_lr * grad / len(picks)
        p = np.exp(theta - theta.max())
        history.append(p / p.sum())
        print(
            f"round {rnd + 1:2d}/{args.rounds}: candidates {picks.tolist()} held-out accuracy "
            f"{np.round(rewards, 3).tolist()} baseline {baseline:.3f}  ({time.perf_counter() - t_start:.0f} s)"
        )

    history = np.array(history)
    print(
        f"\nstage 1 held-out accuracy {accuracy(shared, held_x, held_y):.3f}; final distribution "
        "(probability, held-out accuracy after fine-tuning: mean +- standard error over n candidates):"
    )
    for k in np.argsort(-history[-1]):
        r = np.array(seen[k])
        spread = (
            f"{r.mean():.3f} +- {r.std(ddof=1) / np.sqrt(len(r)):.3f} (n={len(r)})"
            if len(r) > 1
            else (f"{r[0]:.3f} (n=1)" if len(r) else "not sampled")
        )
        print(f"  {history[-1][k]:.3f}  {spread:28s} {k:2d}: {names[k]}")
    if args.rounds:
        plot(history, names, Path(args.out))
        print(f"plot: {Path(args.out).resolve()}")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    loader.close()
    held.close()
    shutil.rmtree(work, ignore_errors=True)
    return history


if __name__ == "__main__":
    main()
