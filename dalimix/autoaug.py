"""AutoAugment-family presets, run inside the DALI pipeline by ``nvidia.dali.auto_aug``.

Selected with timm-like strings (``ImageLoader(auto_augment="rand-m9-n2")``):

- AutoAugment (Cubuk et al., CVPR 2019), the paper's ImageNet policy: ``"original"``, ``"autoaug"``
  or ``"autoaugment"``; DALI's other learned policies by name: ``"reduced_image_net"``, ``"svhn"``,
  ``"reduced_cifar10"``. 25 sub-policies of two (operation, probability, magnitude) steps; one
  drawn uniformly per image.
- RandAugment (Cubuk et al., CVPR-W 2020): ``"rand-m<M>-n<N>"`` with timm's sections: ``m`` the
  magnitude on timm's 0..10 scale (default 10), ``n`` the number of operations per image
  (default 2), ``inc1`` DALI's monotonic suite (timm's "increasing" operations; default ``inc0``,
  the AutoAugment ranges timm uses by default), ``mstd0`` (accepted; other values are not).
- TrivialAugment Wide (Müller & Hutter, ICCV 2021): ``"trivialaugment"``, ``"ta_wide"`` or
  ``"trivial"``: one operation per image at a uniformly drawn magnitude (31 bins, torchvision's).

The augmentation runs on uint8 ``H x W x 3`` images after the random resized crop (before the
flip, which the fused kernel applies), on the pipeline's device. Translations are relative to
the output size (0.45 of it at the top magnitude, timm's ``translate_pct``) for AutoAugment and
RandAugment, and at most 32 px for TrivialAugment (torchvision's); rotated, sheared and
translated images are filled with 128.
"""

from __future__ import annotations

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

_FORMS = ("'original' (AutoAugment ImageNet policy), 'rand-m9-n2' (RandAugment: m in 0..10, n >= 1, "
          "optional inc1), 'trivialaugment' (TrivialAugment Wide), or None")


@dataclass(frozen=True)
class AutoAugmentPreset:
    """A parsed ``auto_augment`` string (see the module docstring).

    Attributes:
        kind: "autoaugment", "randaugment" or "trivialaugment".
        text: the string as given.
        policy: DALI's AutoAugment policy name (AutoAugment only).
        n, m: RandAugment's number of operations and magnitude (timm's 0..10 scale).
        increasing: RandAugment with DALI's monotonic suite (timm's ``inc1``).
    """

    kind: str
    text: str
    policy: str = "image_net"
    n: int = 2
    m: int = TIMM_LEVELS
    increasing: bool = False

    @property
    def canonical(self) -> str:
        """One spelling per preset (``"image_net"``, ``"rand-m9-n2-inc0"``, ``"trivialaugment"``): what
        ``AugmentSpec`` keeps, so a resumed run can tell two presets apart."""
        if self.kind == "autoaugment":
            return self.policy
        if self.kind == "randaugment":
            return f"rand-m{self.m}-n{self.n}-inc{int(self.increasing)}"
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
                raise ValueError(f"auto_augment={text!r}: AutoAugment takes no section {sec!r} here (DALI applies the "
                                 "policy's magnitudes as they are: timm's magnitude noise 'mstd' is not available)")
        return AutoAugmentPreset(kind="autoaugment", text=text, policy=AUTOAUGMENT_POLICIES[head])
    if head == "rand":
        n, m, increasing = 2, TIMM_LEVELS, False
        for sec in sections:
            key, value = _section(text, sec)
            if key == "m" and value == int(value) and 0 <= value <= TIMM_LEVELS:
                m = int(value)
            elif key == "n" and value == int(value) and value >= 1:
                n = int(value)
            elif key == "inc" and value in (0, 1):
                increasing = bool(value)
            elif key == "mstd" and value == 0:
                pass
            elif key in ("mstd", "p", "mmax", "t", "w"):
                raise ValueError(
                    f"auto_augment={text!r}: timm's section {sec!r} has no DALI counterpart (DALI's RandAugment applies "
                    "all n operations at the fixed magnitude m, as in the paper); drop it")
            else:
                raise ValueError(f"auto_augment={text!r}: section {sec!r} is not m<0..10>, n<1..>, inc<0|1> or mstd0")
        return AutoAugmentPreset(kind="randaugment", text=text, n=n, m=m, increasing=increasing)
    if head in TRIVIAL_NAMES:
        if sections:
            raise ValueError(f"auto_augment={text!r}: TrivialAugment takes no sections; use {head!r}")
        return AutoAugmentPreset(kind="trivialaugment", text=text)
    if head in ("v0", "v0r", "originalr", "3a", "augmix"):
        raise ValueError(f"auto_augment={text!r}: timm's {head!r} has no counterpart in DALI's auto_aug; use {_FORMS}")
    raise ValueError(f"auto_augment={text!r} is not a known preset; use {_FORMS}")


def _section(text: str, sec: str) -> tuple[str, float]:
    match = re.fullmatch(r"([a-z]+)(\d+(?:\.\d*)?)", sec)
    if not match:
        raise ValueError(f"auto_augment={text!r}: cannot read section {sec!r} (expected a name and a number, e.g. 'm9')")
    return match.group(1), float(match.group(2))


def apply_preset(images, preset, *, height: int, width: int):
    """Apply ``preset`` (an ``AutoAugmentPreset`` or its string) to a DALI batch of uint8
    ``H x W x 3`` images (inside a pipeline definition built with ``enable_conditionals=True``);
    returns the augmented batch, same shape and type."""
    if not isinstance(preset, AutoAugmentPreset):
        preset = parse_auto_augment(preset)
    with dali_alias_warnings_silenced():  # DALI's augmentations use aliases DALI deprecates
        return _apply_preset(images, preset, height=height, width=width)


def _apply_preset(images, preset, *, height: int, width: int):
    from nvidia.dali.auto_aug import auto_augment, rand_augment, trivial_augment

    shape = (height, width)
    if preset.kind == "autoaugment":
        if preset.policy == "reduced_image_net":  # has no translations, so takes no shape
            return auto_augment.auto_augment(images, policy_name=preset.policy, fill_value=FILL_VALUE)
        return auto_augment.auto_augment(images, policy_name=preset.policy, shape=shape,
                                         max_translate_rel=MAX_TRANSLATE_REL, fill_value=FILL_VALUE)
    if preset.kind == "randaugment":
        return rand_augment.rand_augment(images, n=preset.n, m=preset.m, num_magnitude_bins=TIMM_LEVELS + 1,
                                         shape=shape, max_translate_rel=MAX_TRANSLATE_REL,
                                         monotonic_mag=preset.increasing, fill_value=FILL_VALUE)
    if preset.kind == "trivialaugment":
        return trivial_augment.trivial_augment_wide(images, num_magnitude_bins=31, fill_value=FILL_VALUE)
    raise ValueError(f"unknown preset kind {preset.kind!r}")
