"""AutoAugment-family presets (DALI's auto_aug) selected with timm-like strings, run in DALI's CPU-only mode."""

from __future__ import annotations

import pytest
import torch

from dalimix import ImageLoader
from dalimix.autoaug import AutoAugmentPreset, parse_auto_augment


@pytest.mark.parametrize(
    "text, want",
    [
        ("original", dict(kind="autoaugment", policy="image_net")),
        ("autoaug", dict(kind="autoaugment", policy="image_net")),
        ("AutoAugment", dict(kind="autoaugment", policy="image_net")),
        ("original-mstd0", dict(kind="autoaugment", policy="image_net")),
        ("svhn", dict(kind="autoaugment", policy="svhn")),
        ("reduced_cifar10", dict(kind="autoaugment", policy="reduced_cifar10")),
        ("rand-m9-n2", dict(kind="randaugment", m=9, n=2, increasing=False)),
        ("rand-n3-m5-inc1", dict(kind="randaugment", m=5, n=3, increasing=True)),
        ("rand-m9-mstd0-inc0", dict(kind="randaugment", m=9, n=2, increasing=False)),
        ("rand", dict(kind="randaugment", m=10, n=2, p=0.5, mstd=0.0, mmax=None)),  # timm's defaults
        ("rand-m9-mstd0.5-inc1", dict(kind="randaugment", m=9, n=2, mstd=0.5, increasing=True)),
        ("rand-m7-n3-p0.8-mstd101-mmax12", dict(kind="randaugment", m=7, n=3, p=0.8, mstd=float("inf"), mmax=12)),
        ("3a", dict(kind="threeaugment")),
        ("augmix", dict(kind="augmix", m=3, n=3, mmax=-1, p=1.0, mstd=float("inf"))),  # timm's AugMix defaults
        ("augmix-m5-w4-d2-mstd0.5", dict(kind="augmix", m=5, n=4, mmax=2, mstd=0.5)),
        ("trivialaugment", dict(kind="trivialaugment")),
        ("ta_wide", dict(kind="trivialaugment")),
    ],
)
def test_strings_parse_like_timm(text, want):
    preset = parse_auto_augment(text)
    assert isinstance(preset, AutoAugmentPreset) and preset.text == text
    for key, value in want.items():
        assert getattr(preset, key) == value, key


@pytest.mark.parametrize("text", [None, "", "none", "  "])
def test_off(text):
    assert parse_auto_augment(text) is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("rand-m9-n0", "section 'n0'"),
        ("rand-m9.5", "section 'm9.5'"),
        ("rand-m9-p1.5", "section 'p1.5'"),
        ("rand-m9-tweights", "section 'tweights'"),
        ("rand-m9-xyz", "cannot read section 'xyz'"),
        ("original-mstd0.5", "AutoAugment takes no section 'mstd0.5'"),
        ("3a-m5", "ThreeAugment takes no section 'm5'"),
        ("v0", "timm's 'v0' policy has no counterpart"),
        ("augmix-m5-b1", "blended AugMix ('b1', its own untested shortcut) is not implemented"),
        ("augmix-w0", "section 'w0'"),
        ("trivialaugment-m3", "TrivialAugment takes no sections"),
        ("autoaugmentation", "not a known preset"),
        (3, "a string such as"),
    ],
)
def test_bad_strings_say_what_to_write(text, message):
    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace(")", "\\)").replace(".", "\\.")):
        parse_auto_augment(text)


def test_eval_loader_refuses_a_preset(small_dataset):
    with pytest.raises(ValueError, match="use it with train=True"):
        ImageLoader(root=small_dataset, batch_size=4, device="cpu", train=False, auto_augment="rand-m9-n2")
    with pytest.raises(ValueError, match="not a known preset"):
        ImageLoader(root=small_dataset, batch_size=4, device="cpu", auto_augment="randaugment")


def _two_batches(root, auto_augment, seed=5, device="cpu"):
    loader = ImageLoader(
        root=root, batch_size=10, size=24, device=device, seed=seed, hflip=0.0, auto_augment=auto_augment, num_threads=1
    )
    out = [(x.clone(), y.clone()) for x, y in loader]
    loader.close()
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize(
    "preset",
    [
        "original",
        "rand-m9-n2-p1",
        "rand-m7-n1-p1-inc1",
        "rand-m9-mstd0.5-inc1",
        "3a",
        "augmix-m5-w4-d2",
        "trivialaugment",
    ],
)
def test_presets_run_in_dali(small_dataset, preset, device):
    """Each preset changes the crops (the same crops as without it: same seed) and is reproducible
    (on "cpu": DALI's CPU-only mode)."""
    plain = _two_batches(small_dataset, None, device=device)
    first = _two_batches(small_dataset, preset, device=device)
    again = _two_batches(small_dataset, preset, device=device)
    changed = 0
    for (x0, y0), (x, y), (xa, ya) in zip(plain, first, again):
        assert x.shape == x0.shape == (10, 3, 24, 24) and torch.isfinite(x).all()
        assert torch.equal(y, y0) and torch.equal(x, xa) and torch.equal(y, ya)
        changed += int((x != x0).flatten(1).any(1).sum())
    assert changed >= 8  # of 20 images


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("Original", "image_net"),
        ("rand-n2-m9", "rand-m9-n2-p0.5-mstd0-mmax10-inc0"),
        ("rand-m5-inc1-mstd200", "rand-m5-n2-p0.5-mstd101-mmax10-inc1"),
        ("3a", "3a"),
        ("augmix", "augmix-m3-w3-d0-a1-mstd101"),
        ("ta_wide", "trivialaugment"),
    ],
)
def test_canonical_spelling_round_trips(text, canonical):
    preset = parse_auto_augment(text)
    assert preset.canonical == canonical
    again = parse_auto_augment(canonical)
    fields = ("kind", "policy", "n", "m", "p", "mstd", "increasing")
    assert [getattr(again, f) for f in fields] == [getattr(preset, f) for f in fields]
    assert (again.mmax or 10) == (preset.mmax or 10) or max(again.mmax, 0) == max(preset.mmax, 0)  # AugMix depth


def test_preset_resumes_exactly_and_a_state_names_its_preset(small_dataset):
    """DALI's checkpoint carries the preset's random streams: stop after 2 batches, resume, same batches;
    a state saved under another preset is refused."""

    def make(aa):
        return ImageLoader(
            root=small_dataset, batch_size=6, size=24, device="cpu", seed=2, num_threads=1, auto_augment=aa
        )

    want = [x.clone() for x, _ in make("rand-m9-n2")]
    first = make("rand-m9-n2")
    it = iter(first)
    for _ in range(2):
        next(it)
    state = first.state_dict()
    assert state["augment"]["auto_augment"] == "rand-m9-n2-p0.5-mstd0-mmax10-inc0"
    resumed = make("rand-m9-n2")
    resumed.load_state_dict(state)
    got = [x.clone() for x, _ in resumed]
    assert len(got) == len(want) - 2 and all(torch.equal(a, b) for a, b in zip(got, want[2:]))
    with pytest.raises(ValueError, match="auto_augment"):
        make("rand-m5-n2").load_state_dict(state)
