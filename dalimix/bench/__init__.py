"""``dalimix bench``: dalimix against what users would pick instead, on one machine, in one run.

Contenders (each with mixing on and off): dalimix's ``ImageLoader`` + ``dalimix.mix.Mixup``;
torchvision ``ImageFolder`` + v2 transforms + ``DataLoader`` with ``v2.RandomChoice([CutMix,
MixUp])`` in ``collate_fn``; timm ``create_loader`` + ``Mixup`` / ``FastCollateMixup``; a plain
DALI pipeline to float + MixUp/CutMix written with torch ops. Each contender runs in its own
process (``runner``), so its memory and CPU time are its own; the driver interleaves their epochs.

Rooms: ``procstat`` (CPU time and memory of a process tree), ``machine`` (what the run ran on),
``handmix`` (the hand-written torch mixing of the DALI baseline), ``contenders`` (the four
loaders), ``runner`` (one contender in a process), ``driver`` (data view, interleaving, progress),
``report`` (summary, tables, JSON, PNG).
"""

LIBRARIES = ("dalimix", "torchvision", "timm", "dali")

LABELS = {
    "dalimix": "dalimix",
    "torchvision": "torchvision DataLoader + v2",
    "timm": "timm create_loader",
    "dali": "DALI + torch mixing",
}
