"""AutoAugment-family presets, run inside the DALI pipeline by ``nvidia.dali.auto_aug``.

Selected with timm-like strings (``ImageLoader(auto_augment="rand-m9-n2")``):

- AutoAugment (Cubuk et al., CVPR 2019), the paper's ImageNet policy: ``"original"``, ``"autoaug"``
  or ``"autoaugment"``; DALI's other learned policies by name: ``"reduced_image_net"``, ``"svhn"``,
  ``"reduced_cifar10"``. 25 sub-policies of two (operation, probability, magnitude) steps; one
  drawn uniformly per image.
- RandAugment (Cubuk et al., CVPR-W 2020) as timm runs it (``rand_augment_transform``):
  ``"rand-m<M>-n<N>"`` with timm's sections: ``m`` the magnitude on timm's 0..10 scale (default
  10), ``n`` the number of layers (default 2), ``p`` the probability that a layer's operation runs
  (default 0.5), ``mstd`` magnitude noise (per layer ``N(m, mstd)``; > 100: uniform in ``[0, m]``),
  ``mmax`` the magnitude's upper clip (default 10), ``inc1`` timm's "increasing" suite. timm's 15
  operations and level functions (``dalimix.augment.timm_rand_augment``).
- ThreeAugment (Touvron et al., DeiT III, ECCV 2022): ``"3a"``, one of solarize, grayscale, blur.
- TrivialAugment Wide (Müller & Hutter, ICCV 2021): ``"trivialaugment"``, ``"ta_wide"`` or
  ``"trivial"``: one operation per image at a uniformly drawn magnitude (31 bins, torchvision's).
- AugMix (Hendrycks et al., ICLR 2020) as timm's ``augmix-m<M>-w<W>-d<D>-a<A>[-mstd<S>]``
  (``dalimix.augment.augmix``). timm's ``v0``/``v0r``/``originalr`` policies are not available.

The augmentation runs on uint8 ``H x W x 3`` images after the random resized crop (before the
flip, which the fused kernel applies), on the pipeline's device. Translations are relative to
the output size (0.45 of it at the top magnitude, timm's ``translate_pct``) for AutoAugment and
RandAugment, and at most 32 px for TrivialAugment (torchvision's); rotated, sheared and
translated images are filled with 128.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ._quiet import dali_alias_warnings_silenced

AUTOAUGMENT_POLICIES = {
    "original": "image_net",
    "autoaug": "image_net",
    "autoaugment": "image_net",
    "image_net": "image_net",
    "reduced_image_net": "reduced_image_net",
    "svhn": "svhn",
    "reduced_cifar10": "reduced_cifar10",
}
TRIVIAL_NAMES = ("trivialaugment", "trivial", "ta_wide", "trivialaugmentwide")
TIMM_LEVELS = 10  # timm's magnitude scale: 0..10
MAX_TRANSLATE_REL = 0.45  # timm's translate_pct: the largest shift as a fraction of the image side
FILL_VALUE = 128

_FORMS = (
    "'original' (AutoAugment ImageNet policy), 'rand-m9-n2' (timm's RandAugment: m, n, p, mstd, mmax, inc "
    "sections), '3a' (ThreeAugment), 'trivialaugment' (TrivialAugment Wide), or None"
)


@dataclass(frozen=True)
class AutoAugmentPreset:
    """A parsed ``auto_augment`` string (see the module docstring).

    Attributes:
        kind: "autoaugment", "randaugment", "threeaugment", "augmix" or "trivialaugment" (AugMix keeps
            its width in ``n``, depth in ``mmax``, alpha in ``p``).
        text: the string as given.
        policy: DALI's AutoAugment policy name (AutoAugment only).
        n, m: RandAugment's number of layers and magnitude (timm's 0..10 scale).
        p: RandAugment's probability that a layer runs its operation.
        mstd: RandAugment's magnitude noise (0: none; ``inf``: uniform in ``[0, m]``).
        mmax: RandAugment's upper clip of the magnitude (None: 10).
        increasing: RandAugment with timm's "increasing" suite (``inc1``).
    """

    kind: str
    text: str
    policy: str = "image_net"
    n: int = 2
    m: int = TIMM_LEVELS
    increasing: bool = False
    p: float = 0.5
    mstd: float = 0.0
    mmax: int | None = None

    @property
    def canonical(self) -> str:
        """One spelling per preset (``"image_net"``, ``"rand-m9-n2-p0.5-mstd0-mmax10-inc0"``, ``"3a"``,
        ``"trivialaugment"``): what ``AugmentSpec`` keeps, so a resumed run can tell two presets apart."""
        if self.kind == "autoaugment":
            return self.policy
        if self.kind == "randaugment":
            mstd = "101" if math.isinf(self.mstd) else f"{self.mstd:g}"
            return (
                f"rand-m{self.m}-n{self.n}-p{self.p:g}-mstd{mstd}-mmax{self.mmax or TIMM_LEVELS}"
                f"-inc{int(self.increasing)}"
            )
        if self.kind == "threeaugment":
            return "3a"
        if self.kind == "augmix":  # n: width, mmax: depth, p: alpha
            assert self.mmax is not None  # an AugMix preset always has its depth
            mstd = "101" if math.isinf(self.mstd) else f"{self.mstd:g}"
            return f"augmix-m{self.m}-w{self.n}-d{max(self.mmax, 0)}-a{self.p:g}-mstd{mstd}"
        return "trivialaugment"


def parse_auto_augment(text) -> AutoAugmentPreset | None:
    """``"rand-m9-n2"`` -> ``AutoAugmentPreset``; ``None``, ``""`` and ``"none"`` -> ``None``.

    Raises ValueError naming the part of the string that is wrong and the accepted forms.
    """
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError(f"auto_augment={text!r}: a string such as {_FORMS}")
    clean = text.strip().lower()
    if clean in ("", "none"):
        return None
    head, *sections = clean.split("-")
    if head in AUTOAUGMENT_POLICIES:
        for sec in sections:
            key, value = _section(text, sec)
            if key != "mstd" or value != 0:
                raise ValueError(
                    f"auto_augment={text!r}: AutoAugment takes no section {sec!r} here (DALI applies the "
                    "policy's magnitudes as they are: timm's magnitude noise 'mstd' is not available)"
                )
        return AutoAugmentPreset(kind="autoaugment", text=text, policy=AUTOAUGMENT_POLICIES[head])
    if head == "rand":
        n, m, p, mstd, mmax, increasing = 2, TIMM_LEVELS, 0.5, 0.0, None, False
        for sec in sections:
            if sec.startswith("t") or sec.startswith("w"):
                raise ValueError(
                    f"auto_augment={text!r}: timm's weighted / named operation sets (section {sec!r}) are "
                    "not available; drop the section (timm's default suite is used)"
                )
            key, value = _section(text, sec)
            if key == "m" and value == int(value):
                m = int(value)
            elif key == "n" and value == int(value) and value >= 1:
                n = int(value)
            elif key == "p" and 0 <= value <= 1:
                p = float(value)
            elif key == "mstd":
                mstd = math.inf if value > 100 else float(value)
            elif key == "mmax" and value == int(value) and value >= 1:
                mmax = int(value)
            elif key == "inc" and value in (0, 1):
                increasing = bool(value)
            else:
                raise ValueError(
                    f"auto_augment={text!r}: section {sec!r} is not m<int>, n<1..>, p<0..1>, mstd<float>, "
                    "mmax<int>, inc<0|1>"
                )
        return AutoAugmentPreset(
            kind="randaugment", text=text, n=n, m=m, p=p, mstd=mstd, mmax=mmax, increasing=increasing
        )
    if head == "3a":
        for sec in sections:
            key, value = _section(text, sec)
            if key != "mstd" or value != 0:
                raise ValueError(f"auto_augment={text!r}: ThreeAugment takes no section {sec!r} here; use '3a'")
        return AutoAugmentPreset(kind="threeaugment", text=text)
    if head in TRIVIAL_NAMES:
        if sections:
            raise ValueError(f"auto_augment={text!r}: TrivialAugment takes no sections; use {head!r}")
        return AutoAugmentPreset(kind="trivialaugment", text=text)
    if head == "augmix":
        m, width, depth, alpha, mstd = 3, 3, -1, 1.0, math.inf
        for sec in sections:
            key, value = _section(text, sec)
            if key == "m" and value == int(value):
                m = int(value)
            elif key == "w" and value == int(value) and value >= 1:
                width = int(value)
            elif key == "d" and value == int(value):
                depth = int(value)
            elif key == "a" and value > 0:
                alpha = float(value)
            elif key == "mstd":
                mstd = math.inf if value > 100 else float(value)
            elif key == "b" and value == 0:
                pass
            elif key == "b":
                raise ValueError(
                    f"auto_augment={text!r}: timm's blended AugMix ('b1', its own untested shortcut) is not "
                    "implemented; drop the section for the paper's form"
                )
            else:
                raise ValueError(
                    f"auto_augment={text!r}: section {sec!r} is not m<int>, w<1..>, d<int>, a<float>, mstd<float>, b0"
                )
        return AutoAugmentPreset(kind="augmix", text=text, m=m, n=width, p=alpha, mstd=mstd, mmax=depth)
    if head in ("v0", "v0r", "originalr"):
        raise ValueError(
            f"auto_augment={text!r}: timm's {head!r} policy has no counterpart in DALI's auto_aug; use {_FORMS}"
        )
    raise ValueError(f"auto_augment={text!r} is not a known preset; use {_FORMS}")


def _section(text: str, sec: str) -> tuple[str, float]:
    match = re.fullmatch(r"([a-z]+)(\d+(?:\.\d*)?)", sec)
    if not match:
        raise ValueError(
            f"auto_augment={text!r}: cannot read section {sec!r} (expected a name and a number, e.g. 'm9')"
        )
    return match.group(1), float(match.group(2))


def apply_preset(images, preset, *, height: int, width: int, seed: int | None = None):
    """Apply ``preset`` (an ``AutoAugmentPreset`` or its string) to a DALI batch of uint8
    ``H x W x 3`` images (inside a pipeline definition built with ``enable_conditionals=True``);
    returns the augmented batch, same shape and type. ``seed``: of its random draws (None: DALI's,
    from the pipeline seed)."""
    if not isinstance(preset, AutoAugmentPreset):
        preset = parse_auto_augment(preset)
    with dali_alias_warnings_silenced():  # DALI's augmentations use aliases DALI deprecates
        return _apply_preset(images, preset, height=height, width=width, seed=seed)


def _apply_preset(images, preset, *, height: int, width: int, seed: int | None):
    from nvidia.dali.auto_aug import auto_augment, trivial_augment

    from .augment import augmix, three_augment, timm_rand_augment

    shape = (height, width)
    if preset.kind == "autoaugment":
        if preset.policy == "reduced_image_net":  # has no translations, so takes no shape
            return auto_augment.auto_augment(images, policy_name=preset.policy, fill_value=FILL_VALUE, seed=seed)
        return auto_augment.auto_augment(
            images,
            policy_name=preset.policy,
            shape=shape,
            max_translate_rel=MAX_TRANSLATE_REL,
            fill_value=FILL_VALUE,
            seed=seed,
        )
    if preset.kind == "randaugment":
        return timm_rand_augment(
            images,
            n=preset.n,
            m=preset.m,
            p=preset.p,
            mstd=preset.mstd,
            mmax=preset.mmax,
            increasing=preset.increasing,
            height=height,
            width=width,
            translate_pct=MAX_TRANSLATE_REL,
            seed=seed,
        )
    if preset.kind == "threeaugment":
        return three_augment(images, seed=seed)
    if preset.kind == "augmix":
        return augmix(
            images,
            m=preset.m,
            width=preset.n,
            depth=preset.mmax,
            alpha=preset.p,
            mstd=preset.mstd,
            height=height,
            width_px=width,
            seed=seed,
        )
    if preset.kind == "trivialaugment":
        return trivial_augment.trivial_augment_wide(images, num_magnitude_bins=31, fill_value=FILL_VALUE, seed=seed)
    raise ValueError(f"unknown preset kind {preset.kind!r}")
