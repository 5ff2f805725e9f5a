"""timm's training augmentations as DALI graph pieces: functions that take and return DataNodes.

``Augment`` says what a training pipeline does after the random resized crop and flip, with timm's
names (``timm.data.create_transform``): ``vflip``, ``color_jitter`` / ``color_jitter_prob``,
``grayscale_prob``, ``gaussian_blur_prob`` and ``interpolation="random"`` (bilinear or bicubic per
sample, the crop's resize). ``secondary(images, augment, preset, ...)`` runs them in timm's order —
vertical flip, the ``auto_augment`` preset, colour jitter, grayscale, blur — on uint8 ``H x W x 3``
batches, on the batch's device. The timm-style presets (``rand-*`` RandAugment with ``p``, ``mstd``,
``mmax``, ``inc``; ``3a``, DeiT III's ThreeAugment) are built here too (``dalimix.autoaug`` parses the
strings). Every random draw is DALI's, from seeds derived from the pipeline's seed.

Where DALI computes differently from PIL (timm works on PIL images), the results differ by a few grey
levels at most, except as listed in the README (fill colour, geometric interpolation, hue space).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from . import validate as v

FILL_VALUE = 128  # DALI's warp/rotate fill is one number for all channels (timm fills with the mean colour)
BLUR_KERNEL = 23  # timm's gaussian_blur_prob: torchvision GaussianBlur(kernel_size=23), sigma in (0.1, 2.0)
BLUR_SIGMA = (0.1, 2.0)
LEVELS = 10  # timm's magnitude scale (_LEVEL_DENOM)
BINS_PER_LEVEL = 10  # magnitudes drawn with mstd are used at 0.1 resolution (101 bins over 0..10)


@dataclass(frozen=True)
class Augment:
    """timm's train-time augmentations after crop and flip (``timm.data.create_transform``'s names).

    Attributes:
        vflip: probability of a vertical flip.
        color_jitter: ``(brightness, contrast, saturation, hue)`` factors as torchvision's
            ``ColorJitter`` (a scalar ``c`` is ``(c, c, c, 0)``, timm's rule); ``None`` or zeros: off.
        color_jitter_prob: jitter applied with this probability (``None``: always, timm's default).
        grayscale_prob: probability of converting to grayscale (``RandomGrayscale``).
        gaussian_blur_prob: probability of a Gaussian blur, kernel 23, sigma uniform in (0.1, 2.0).
        random_interpolation: the crop's resize draws bilinear or bicubic per sample (timm's
            ``interpolation="random"``).
    """

    vflip: float = 0.0
    color_jitter: tuple[float, float, float, float] | None = None
    color_jitter_prob: float | None = None
    grayscale_prob: float = 0.0
    gaussian_blur_prob: float = 0.0
    random_interpolation: bool = False

    def __post_init__(self):
        object.__setattr__(self, "vflip", v.number("vflip", self.vflip, lo=0, hi=1))
        object.__setattr__(self, "color_jitter", jitter_factors(self.color_jitter))
        if self.color_jitter_prob is not None:
            object.__setattr__(
                self, "color_jitter_prob", v.number("color_jitter_prob", self.color_jitter_prob, lo=0, hi=1)
            )
        object.__setattr__(self, "grayscale_prob", v.number("grayscale_prob", self.grayscale_prob or 0.0, lo=0, hi=1))
        object.__setattr__(
            self, "gaussian_blur_prob", v.number("gaussian_blur_prob", self.gaussian_blur_prob or 0.0, lo=0, hi=1)
        )
        object.__setattr__(self, "random_interpolation", v.flag("random_interpolation", self.random_interpolation))

    @property
    def active(self) -> bool:
        """Does anything run after the flip (besides a preset)?"""
        return bool(self.vflip or self.jitter_on or self.grayscale_prob or self.gaussian_blur_prob)

    @property
    def jitter_on(self) -> bool:
        return self.color_jitter is not None and self.color_jitter_prob != 0

    @property
    def needs_conditionals(self) -> bool:
        return self.jitter_on or bool(self.grayscale_prob or self.gaussian_blur_prob)


def jitter_factors(value):
    """timm's ``color_jitter`` -> ``(b, c, s, h)`` or None: a scalar is ``(c, c, c, 0)``, 3 or 4 values
    as given; all zero (or None) is off."""
    if value is None:
        return None
    values = np.atleast_1d(np.asarray(value, dtype=float)).tolist() if not isinstance(value, bool) else None
    if values is None or len(values) not in (1, 3, 4) or not all(math.isfinite(x) and x >= 0 for x in values):
        raise ValueError(
            f"color_jitter={value!r}: a factor >= 0 (brightness = contrast = saturation) or 3/4 factors "
            "(brightness, contrast, saturation[, hue <= 0.5]), as timm"
        )
    if len(values) == 1:
        values = values * 3
    if len(values) == 3:
        values = values + [0.0]
    if values[3] > 0.5:
        raise ValueError(f"color_jitter={value!r}: hue must be in [0, 0.5] (torchvision's ColorJitter)")
    if not any(values):
        return None
    return tuple(float(x) for x in values)


# ------------------------------------------------------------------------------ graph pieces
def _seed(seed, k: int):
    if seed is None:
        return None
    from .rng import derive_seed

    return derive_seed(seed, 100 + k)


def interp_type(base, augment: Augment | None, *, seed=None):
    """The crop's ``interp_type``: ``base`` (a DALI enum), or per sample bilinear/bicubic (timm's
    ``interpolation="random"``)."""
    if augment is None or not augment.random_interpolation:
        return base
    from nvidia.dali import fn, types

    choice = fn.random.choice([int(types.INTERP_LINEAR), int(types.INTERP_CUBIC)], seed=_seed(seed, 0))
    return fn.cast(choice, dtype=types.INTERP_TYPE)


def secondary(images, augment: Augment | None, preset, *, height: int, width: int, seed=None):
    """vflip -> ``preset`` (an ``auto_augment`` string / ``AutoAugmentPreset`` or None) -> colour jitter ->
    grayscale -> blur on uint8 ``H x W x 3`` DataNodes (timm's order); returns the batch."""
    from nvidia.dali import fn

    augment = augment or Augment()
    if augment.vflip > 0:
        images = fn.flip(
            images, horizontal=0, vertical=fn.random.coin_flip(probability=augment.vflip, seed=_seed(seed, 1))
        )
    if preset is not None:
        from .autoaug import apply_preset

        images = apply_preset(images, preset, height=height, width=width, seed=_seed(seed, 2))
    if augment.jitter_on:
        images = color_jitter(images, augment.color_jitter, prob=augment.color_jitter_prob, seed=_seed(seed, 3))
    if augment.grayscale_prob:
        images = _maybe(images, grayscale, augment.grayscale_prob, seed=_seed(seed, 4))
    if augment.gaussian_blur_prob:
        sigma = fn.random.uniform(range=list(BLUR_SIGMA), seed=_seed(seed, 5))
        images = _maybe(
            images,
            lambda x: fn.gaussian_blur(x, window_size=BLUR_KERNEL, sigma=sigma),
            augment.gaussian_blur_prob,
            seed=_seed(seed, 6),
        )
    return images


def _identity(x, *_, **__):
    return x


def _maybe(images, op, prob: float, *, seed=None):
    """``op(images)`` for a random ``prob`` share of the samples (DALI conditionals), the rest unchanged."""
    from nvidia.dali import fn, types
    from nvidia.dali.auto_aug.core import select

    if prob >= 1:
        return op(images)
    apply = fn.cast(fn.random.coin_flip(probability=prob, seed=seed), dtype=types.INT32)
    return select([_identity, lambda x: op(x)], apply, images)


def grayscale(images):
    """RGB -> luma (0.299 R + 0.587 G + 0.114 B, PIL's "L"), repeated over 3 channels."""
    from nvidia.dali import fn, types

    grey = fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY)
    return fn.cat(grey, grey, grey, axis=2)


_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_PERMUTATIONS = np.array(list(itertools.permutations(range(4))), dtype=np.int32)


def color_jitter(images, factors, *, prob=None, seed=None):
    """torchvision's ``ColorJitter(b, c, s, h)``: brightness, contrast and saturation factors uniform in
    ``[max(0, 1 - x), 1 + x]``, hue shift uniform in ``[-h, h]`` (of the circle), the four applied in a
    random order per sample; with ``prob``: applied to that share of the samples only.

    Brightness scales; contrast blends with the image's mean luma, saturation with each pixel's luma
    (PIL's ImageEnhance rules); hue is DALI's hue rotation. Computed in float, clipped to 0..255
    after each step, rounded once at the end (PIL rounds after each step)."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath
    from nvidia.dali.auto_aug.core import select

    b, c, s, h = factors

    def draw(x, k):
        return fn.random.uniform(range=[max(0.0, 1 - x), 1 + x], seed=_seed(seed, 10 + k))

    fb, fc, fs = draw(b, 0), draw(c, 1), draw(s, 2)
    fh = fn.random.uniform(range=[-h, h], seed=_seed(seed, 13)) * 360.0 if h else None
    luma = types.Constant(_LUMA)

    def clip(x):
        return dmath.clamp(x, 0.0, 255.0)

    def brightness(x, **_):
        return clip(x * fb)

    def contrast(x, **_):
        mean = fn.reductions.mean(x, axes=[0, 1], keep_dims=True)
        center = fn.reductions.sum(mean * luma, axes=[2], keep_dims=True)
        return clip(center + (x - center) * fc)

    def saturation(x, **_):
        grey = fn.reductions.sum(x * luma, axes=[2], keep_dims=True)
        return clip(grey + (x - grey) * fs)

    def hue(x, **_):
        return clip(fn.hue(x, hue=fh))

    ops = [
        brightness if b else _identity,
        contrast if c else _identity,
        saturation if s else _identity,
        hue if h else _identity,
    ]

    def jitter(x):
        order = types.Constant(_PERMUTATIONS)[
            fn.random.uniform(values=list(range(24)), dtype=types.INT32, seed=_seed(seed, 14))
        ]
        x = fn.cast(x, dtype=types.FLOAT)
        for k in range(4):
            x = select(ops, order[k], x)
        return fn.cast(x, dtype=types.UINT8)

    if prob is None:
        return jitter(images)
    return _maybe(images, jitter, prob, seed=_seed(seed, 15))


# ------------------------------------------------------------------ timm RandAugment, 3a
def _timm_ops(increasing: bool, translate_pct: float):
    """DALI augmentations parametrised by timm's level functions, magnitude = the level on 0..mmax."""
    from nvidia.dali.auto_aug import augmentations as a

    def enhance(level):  # timm _enhance_level_to_arg: 0.1 .. 1.9
        return np.float32(level / LEVELS * 1.8 + 0.1)

    def enhance_inc(level):  # signed level: 1 -+ 0.9 level / 10, kept >= 0.1
        return np.float32(max(0.1, 1.0 + level / LEVELS * 0.9))

    def sharp(factor):  # PIL: factor * image + (1 - factor) * smoothed
        blur = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13
        ident: np.ndarray = np.zeros((3, 3), dtype=np.float32)
        ident[1, 1] = 1
        return (factor * ident + (1 - factor) * blur).astype(np.float32)

    def poster_mask(bits):
        bits = int(min(8, max(0, bits)))
        return np.uint8(0xFF ^ ((1 << (8 - bits)) - 1))

    def solarize_thresh(level):
        return np.int32(min(256, int(level / LEVELS * 256)))

    ops = {
        "AutoContrast": a.auto_contrast,
        "Equalize": a.equalize,
        "Invert": a.invert,
        "Rotate": a.rotate.augmentation(mag_to_param=lambda m: np.float32(m / LEVELS * 30)),
        "ShearX": a.shear_x.augmentation(mag_to_param=lambda m: np.float32([m / LEVELS * 0.3, 0])),
        "ShearY": a.shear_y.augmentation(mag_to_param=lambda m: np.float32([0, m / LEVELS * 0.3])),
        "TranslateXRel": a.translate_x.augmentation(mag_to_param=lambda m: np.float32([m / LEVELS * translate_pct, 0])),
        "TranslateYRel": a.translate_y.augmentation(mag_to_param=lambda m: np.float32([0, m / LEVELS * translate_pct])),
        "SolarizeAdd": a.solarize_add.augmentation(mag_to_param=lambda m: np.uint8(min(128, int(m / LEVELS * 110)))),
    }
    if increasing:
        ops.update(
            {
                "PosterizeIncreasing": a.posterize.augmentation(
                    mag_to_param=lambda m: poster_mask(4 - int(m / LEVELS * 4))
                ),
                "SolarizeIncreasing": a.solarize.augmentation(
                    mag_to_param=lambda m: np.int32(256) - solarize_thresh(m)
                ),
                "ColorIncreasing": a.color.augmentation(randomly_negate=True, mag_to_param=enhance_inc),
                "ContrastIncreasing": a.contrast.augmentation(randomly_negate=True, mag_to_param=enhance_inc),
                "BrightnessIncreasing": a.brightness.augmentation(randomly_negate=True, mag_to_param=enhance_inc),
                "SharpnessIncreasing": a.sharpness.augmentation(
                    randomly_negate=True, mag_to_param=lambda m: sharp(enhance_inc(m))
                ),
            }
        )
    else:
        ops.update(
            {
                "Posterize": a.posterize.augmentation(mag_to_param=lambda m: poster_mask(int(m / LEVELS * 4))),
                "Solarize": a.solarize.augmentation(mag_to_param=solarize_thresh),
                "Color": a.color.augmentation(randomly_negate=False, mag_to_param=enhance),
                "Contrast": a.contrast.augmentation(randomly_negate=False, mag_to_param=enhance),
                "Brightness": a.brightness.augmentation(randomly_negate=False, mag_to_param=enhance),
                "Sharpness": a.sharpness.augmentation(randomly_negate=False, mag_to_param=lambda m: sharp(enhance(m))),
            }
        )
    return ops


# timm's _RAND_TRANSFORMS / _RAND_INCREASING_TRANSFORMS, in timm's order
RAND_TRANSFORMS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
RAND_INCREASING_TRANSFORMS = tuple(
    n + "Increasing" if n in ("Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness") else n
    for n in RAND_TRANSFORMS
)


def timm_rand_augment(
    images,
    *,
    n: int,
    m: int,
    p: float = 0.5,
    mstd: float = 0.0,
    mmax: int | None = None,
    increasing: bool = False,
    height: int,
    width: int,
    translate_pct: float = 0.45,
    seed=None,
):
    """timm's ``RandAugment`` (``rand_augment_transform``): ``n`` layers, each picks one of timm's 15
    operations uniformly (with replacement), runs it with probability ``p`` at magnitude ``m`` (with
    ``mstd``: per layer ``N(m, mstd)``, ``inf``: uniform in ``[0, m]``), clipped to ``[0, mmax or 10]``
    and used at 0.1 resolution; signed operations negate with probability 1/2."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath
    from nvidia.dali.auto_aug import augmentations as a
    from nvidia.dali.auto_aug.core import select, signed_bin

    top = float(mmax or LEVELS)
    bins = int(round(top * BINS_PER_LEVEL)) + 1
    table = _timm_ops(increasing, translate_pct)
    names = RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS
    ops = [_with_range(table[name], top) for name in names] + [a.identity]
    skip = len(ops) - 1
    for layer in range(n):
        k = 10 * (layer + 1)
        op = fn.random.uniform(values=list(range(len(names))), dtype=types.INT32, seed=_seed(seed, k))
        if p < 1:
            run = fn.cast(fn.random.coin_flip(probability=p, seed=_seed(seed, k + 1)), dtype=types.INT32)
            op = op * run + skip * (1 - run)
        if mstd == 0:
            level = min(float(m), top)
            mag = signed_bin(int(round(level * BINS_PER_LEVEL)), seed=_seed(seed, k + 2))
        else:
            if math.isinf(mstd):
                level = fn.random.uniform(range=[0.0, float(m)], seed=_seed(seed, k + 3))
            else:
                level = fn.random.normal(mean=float(m), stddev=float(mstd), seed=_seed(seed, k + 3))
            level = dmath.clamp(level, 0.0, top)
            mag = signed_bin(fn.cast(level * float(BINS_PER_LEVEL), dtype=types.INT32), seed=_seed(seed, k + 2))
        images = select(
            ops, op, images, magnitude_bin=mag, num_magnitude_bins=bins, shape=[height, width], fill_value=FILL_VALUE
        )
    return images


def _with_range(aug, top: float):
    """``aug`` with its magnitudes spanning timm's levels ``0..top`` (ops without a magnitude unchanged)."""
    if aug.mag_range is None:
        return aug
    return aug.augmentation(mag_range=(0.0, top))


def three_augment(images, *, seed=None):
    """timm's ``3a`` (DeiT III's ThreeAugment, Touvron et al., ECCV 2022): per sample one of solarize
    (threshold 128), grayscale, Gaussian blur with sigma uniform in (0.1, 2.0) — timm's
    ``auto_augment_policy_3a``."""
    from nvidia.dali import fn, types
    from nvidia.dali.auto_aug import augmentations as a
    from nvidia.dali.auto_aug.core import select

    sigma = fn.random.uniform(range=[0.1, 2.0], seed=_seed(seed, 40))

    def solarize(x):
        return a.solarize.op(x, types.Constant(np.int32(128)))

    def blur(x):
        return fn.gaussian_blur(x, sigma=sigma)

    choice = fn.random.uniform(values=[0, 1, 2], dtype=types.INT32, seed=_seed(seed, 41))
    return select([solarize, grayscale, blur], choice, images)


# timm's _AUGMIX_TRANSFORMS, in timm's order
AUGMIX_TRANSFORMS = (
    "AutoContrast",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "Equalize",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)


def _level(m: float, mstd: float, top: float, seed):
    """A per-sample magnitude level as timm's AugmentOp draws it (mstd 0: m; inf: uniform in [0, m];
    else N(m, mstd)), clipped to [0, top]; returns a signed magnitude bin at 0.1 resolution."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath
    from nvidia.dali.auto_aug.core import signed_bin

    if mstd == 0:
        return signed_bin(int(round(min(float(m), top) * BINS_PER_LEVEL)), seed=_seed(seed, 1))
    if math.isinf(mstd):
        level = fn.random.uniform(range=[0.0, float(m)], seed=_seed(seed, 2))
    else:
        level = fn.random.normal(mean=float(m), stddev=float(mstd), seed=_seed(seed, 2))
    level = dmath.clamp(level, 0.0, top)
    return signed_bin(fn.cast(level * float(BINS_PER_LEVEL), dtype=types.INT32), seed=_seed(seed, 1))


def augmix(
    images,
    *,
    m: int = 3,
    width: int = 3,
    depth: int = -1,
    alpha: float = 1.0,
    mstd: float = math.inf,
    height: int,
    width_px: int,
    seed=None,
):
    """timm's ``AugMixAugment`` (Hendrycks et al., "AugMix", ICLR 2020), its default (non-blended) form:
    ``width`` chains of ``depth`` operations (-1: 1..3 per chain) drawn from timm's AugMix suite, each at
    a magnitude drawn as timm's ``AugmentOp`` does (default ``mstd=inf``: uniform in ``[0, m]``); the
    chains summed in float with Dirichlet(``alpha``) weights, clipped and truncated to uint8, then
    blended with the original by Beta(``alpha``, ``alpha``)."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath
    from nvidia.dali.auto_aug import augmentations as a
    from nvidia.dali.auto_aug.core import select

    top = float(LEVELS)
    bins = int(round(top * BINS_PER_LEVEL)) + 1
    table = _timm_ops(True, 0.3)  # timm's augmix hparams: translate_pct 0.3
    ops = [_with_range(table[name], top) for name in AUGMIX_TRANSFORMS] + [a.identity]
    skip = len(ops) - 1
    mixed = None
    left = None  # stick-breaking: Dirichlet(alpha, ..., alpha) weights from Beta draws
    for c in range(width):
        k = 100 * (c + 1)
        if c < width - 1:
            share = fn.random.beta(alpha=float(alpha), beta=float(alpha) * (width - 1 - c), seed=_seed(seed, k))
            weight = share if left is None else left * share
            left = (1.0 - share) if left is None else left * (1.0 - share)
        else:
            weight = left if left is not None else 1.0
        chain_depth = (
            depth if depth > 0 else fn.random.uniform(values=[1, 2, 3], dtype=types.INT32, seed=_seed(seed, k + 1))
        )
        x = images
        for d in range(depth if depth > 0 else 3):
            op = fn.random.uniform(values=list(range(skip)), dtype=types.INT32, seed=_seed(seed, k + 10 + d))
            if depth <= 0 and d > 0:  # the chain is shorter than d + 1 for some samples
                run = fn.cast(chain_depth > d, dtype=types.INT32)
                op = op * run + skip * (1 - run)
            mag = _level(m, mstd, top, _seed(seed, k + 20 + d))
            x = select(
                ops, op, x, magnitude_bin=mag, num_magnitude_bins=bins, shape=[height, width_px], fill_value=FILL_VALUE
            )
        term = fn.cast(x, dtype=types.FLOAT) * weight
        mixed = term if mixed is None else mixed + term
    mixed = dmath.floor(dmath.clamp(mixed, 0.0, 255.0))  # timm: np.clip, then astype(uint8) truncates
    lam = fn.random.beta(alpha=float(alpha), beta=float(alpha), seed=_seed(seed, 99))
    out = fn.cast(images, dtype=types.FLOAT) * (1.0 - lam) + mixed * lam  # PIL Image.blend(img, mixed, m)
    return fn.cast(dmath.clamp(out, 0.0, 255.0), dtype=types.UINT8)
