"""Mixing methods whose masks depend on the images: SaliencyMix and AttentiveMix.

They are mask policies: the mixer plans their lam and partner on the host like any method (no
image needed), and the loader's mask hook computes their masks on the device from the unmixed
batch, just before the fused kernel mixes it (``Mixer.bind`` registers the hook; one mask policy
per mixer). Their targets use the mask mean at full resolution (exactly the pixel fraction).

    mix = Mixer(methods=[MixUp(), SaliencyMix()], mode="elem")          # named like any method
    loader = ImageLoader(root="train/", batch_size=256, size=224, device="cuda", mix=mix)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import validate as v
from ..ops.record import METHOD_MASK
from ..ops.staging import to_device
from .methods import MixMethod, _positive

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, OpenCV's RGB -> grey
_CONSTANTS: dict = {}


def _constants(norm, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(std, mean, LUMA) as float32 on ``device``: one staged copy per (norm, device), then cached."""
    std, mean = (norm.std, norm.mean) if norm is not None else ((1.0,) * 3, (0.0,) * 3)
    key = (tuple(std), tuple(mean), str(device))
    if key not in _CONSTANTS:
        if len(_CONSTANTS) > 64:
            _CONSTANTS.clear()
        _CONSTANTS[key] = tuple(to_device([np.asarray(c, np.float32) for c in (std, mean, LUMA)], device))
    return _CONSTANTS[key]


class MaskPolicy(MixMethod):
    """Base of the built-in mask policies: ``lam ~ Beta(alpha, alpha)`` planned on the host, masks
    from ``mask_policy(images, lam, partner)`` (N x 1 x h x w in [0, 1], 1 = own image) through the
    mask hook, targets from the mask mean."""

    # masks built here are 0/1 by construction: checked one batch later, without a host sync on the GPU
    hook_options = dict(interpolation="nearest", logits=False, target_lam="mask", validate="deferred")

    def __init__(self, *, alpha: float = 1.0):
        self.alpha = _positive("alpha", alpha)
        self._norm = None

    def bind(self, loader) -> None:
        """Called by ``Mixer.bind``: the loader's normalisation (to undo it where a policy needs pixels)."""
        self._norm = getattr(loader, "norm", None)

    def draw_lam(self, rng, count):
        return rng.beta(self.alpha, self.alpha, size=count)

    def fill(self, p, rows, lam, *, rng, height, width, shared):
        lam = np.asarray(lam, dtype=np.float64)
        p.method[rows] = METHOD_MASK
        p.flags[rows] = 0
        p.lam[rows] = lam
        p.target_lam[rows] = lam  # replaced by the mask mean once the hook has run
        for r in rows:
            p.masks[r] = None

    def mask_policy(self, images: torch.Tensor, lam: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# ------------------------------------------------------------------------------- saliency
def _gaussian_kernel(size: int, sigma: float, device) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    k = torch.exp(-x * x / (2 * sigma * sigma))
    return (k / k.sum()).to(torch.float32)


def _filter_reflect(x: torch.Tensor, kernel_1d: torch.Tensor) -> torch.Tensor:
    """Separable filter of N x 1 x h x w with reflect-101 borders (OpenCV's BORDER_REFLECT_101)."""
    r = kernel_1d.numel() // 2
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, kernel_1d.view(1, 1, 1, -1))
    return F.conv2d(x, kernel_1d.view(1, 1, -1, 1))


def spectral_residual(images: torch.Tensor, *, norm=None, work_size: int = 64) -> torch.Tensor:
    """Spectral-residual saliency (Hou & Zhang, "Saliency Detection: A Spectral Residual Approach",
    CVPR 2007), the steps of OpenCV's ``StaticSaliencySpectralResidual``, in torch on the images'
    device (no host copy).

    Grey (BT.601 luma of the de-normalised RGB when ``norm`` is given) -> bilinear resize to
    ``work_size x work_size`` -> FFT; ``R = log|F| - box3(log|F|)``; ``S = gauss5,sigma=8(|IFFT(e^R e^{i arg F})|)^2``
    (reflect-101 borders) -> bilinear resize back.

    Args:
        images: N x 3 x H x W float (any dtype and memory layout).
        norm: the ``Normalization`` the images carry (None: use them as they are).
    Returns:
        N x H x W float32 saliency (larger = more salient).
    """
    n, _, h, w = images.shape
    # resize first: de-normalising and the grey weights are affine per pixel, bilinear weights sum
    # to 1, so they commute with the resize (and then touch 64 x 64 pixels, not H x W)
    x = F.interpolate(images.to(torch.float32), size=(work_size, work_size), mode="bilinear", align_corners=False)
    std, mean, luma = (c.view(1, 3, 1, 1) for c in _constants(norm, x.device))
    if norm is not None:
        x = x * std + mean
    small = (x * luma).sum(dim=1, keepdim=True)
    spec = torch.fft.fft2(small)
    amp = spec.abs().clamp_min(1e-20)
    log_amp = torch.log(amp)
    residual = log_amp - _filter_reflect(log_amp, torch.full((3,), 1.0 / 3.0, device=x.device))
    back = torch.fft.ifft2(torch.exp(residual) * (spec / amp))
    sal = _filter_reflect(back.abs().to(torch.float32), _gaussian_kernel(5, 8.0, x.device)) ** 2
    return F.interpolate(sal, size=(h, w), mode="bilinear", align_corners=False).view(n, h, w)


def box_around(peak_y: torch.Tensor, peak_x: torch.Tensor, lam: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """SaliencyMix's box (the official code's rule): sides ``int(H sqrt(1 - lam))``,
    ``int(W sqrt(1 - lam))``, rows ``[py - cut_h // 2, py + cut_h // 2)`` and columns likewise,
    clipped to the image. Returns N x 4 int64 ``(y0, x0, y1, x1)`` on the device."""
    ratio = torch.sqrt(1.0 - lam.to(torch.float64).clamp(0, 1))
    cut_h = torch.floor(height * ratio).to(torch.int64)
    cut_w = torch.floor(width * ratio).to(torch.int64)
    y0 = (peak_y - cut_h // 2).clamp(0, height)
    y1 = (peak_y + cut_h // 2).clamp(0, height)
    x0 = (peak_x - cut_w // 2).clamp(0, width)
    x1 = (peak_x + cut_w // 2).clamp(0, width)
    return torch.stack([y0, x0, y1, x1], dim=1)


def box_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """N x 1 x H x W float32: 0 inside each box (the partner shows), 1 outside."""
    ys = torch.arange(height, device=boxes.device).view(1, height)
    xs = torch.arange(width, device=boxes.device).view(1, width)
    y0, x0, y1, x1 = (boxes[:, k].view(-1, 1) for k in range(4))
    rows = ((ys >= y0) & (ys < y1)).to(torch.float32)  # N x H
    cols = ((xs >= x0) & (xs < x1)).to(torch.float32)  # N x W
    return (1.0 - rows.unsqueeze(2) * cols.unsqueeze(1)).unsqueeze(1)


class SaliencyMix(MaskPolicy):
    """SaliencyMix (Uddin et al., "SaliencyMix: A Saliency Guided Data Augmentation Strategy for Better
    Regularization", ICLR 2021).

    ``lam ~ Beta(alpha, alpha)``; the partner's most salient pixel (peak of its spectral-residual
    map, ``spectral_residual``) centres a box of ``int(H sqrt(1 - lam)) x int(W sqrt(1 - lam))``
    (the official code's ``py +- cut // 2``, clipped), and the partner's pixels inside that box
    replace the sample's own at the same place. ``lam = 1 - box_area / (H W)`` (the mask mean).

    Per sample by default (the paper's definition); ``shared_box=True`` is the official code's and
    OpenMixup's shortcut: one box for the whole batch, from the first sample's lam and its partner's
    saliency. Differences from the official code: the saliency is the spectral residual computed in
    torch on the device (the code calls OpenCV's fine-grained saliency on the host) and is not
    quantised to uint8 before the argmax. The masks are full-resolution (a box edge can fall on any
    pixel): the kernel reads 4 bytes of mask per pixel.
    """

    name = "saliencymix"

    def __init__(self, *, alpha: float = 1.0, shared_box: bool = False):
        super().__init__(alpha=alpha)
        self.shared_box = v.flag("shared_box", shared_box)

    @torch.no_grad()
    def mask_policy(self, images, lam, partner):
        n, _, h, w = images.shape
        partner = partner.to(images.device, torch.int64, non_blocking=True)  # device to device
        lam = lam.to(images.device, non_blocking=True)  # device to device
        peak = spectral_residual(images, norm=self._norm).reshape(n, -1).argmax(dim=1)[partner]
        if self.shared_box:
            peak, lam = peak[:1].expand(n), lam[:1].expand(n)
        return box_masks(box_around(peak // w, peak % w, lam, h, w), h, w)


# ------------------------------------------------------------------------------ attention
PATCH_SOURCES = ("partner", "own")


class AttentiveMix(MaskPolicy):
    """Attentive CutMix (Walawalkar et al., "Attentive CutMix: An Enhanced Data Augmentation Approach
    for Deep Learning Based Image Classification", ICASSP 2020).

    A feature extractor you give (``features(images) -> N x C x h x w``, e.g. a pretrained
    ResNet-50 up to its last stage: a 7 x 7 grid at 224 px; ``dalimix.automix.FeatureTap`` taps
    any named layer; put the model in eval mode, it runs under ``torch.no_grad()`` on the loader's
    normalised batch) scores the h x w grid cells by their channel-mean activation; the ``top_k``
    most attentive cells are exchanged, upsampled nearest to the image (cells of ``H / h`` pixels):

    - ``patches_from="partner"`` (the paper): the partner's ``top_k`` most attentive cells are pasted
      onto the sample at the same place;
    - ``patches_from="own"`` (OpenMixup's code): the sample keeps its own ``top_k`` most attentive
      cells and the partner fills the rest.

    ``top_k=6`` is the paper's (6 of 49); ``top_k=None`` is OpenMixup's "AttentiveMix+":
    ``k = clip(int(h w lam'), 1, h w)`` per sample with ``lam ~ Beta(alpha, alpha)`` and ``lam'``
    the share that goes to the exchanged cells (``1 - lam`` for "partner", ``lam`` for "own").
    ``lam`` = the mask mean at full resolution. Ties in attention go to the lower cell index.
    """

    name = "attentivemix"

    def __init__(self, *, features=None, top_k: int | None = 6, patches_from: str = "partner", alpha: float = 1.0):
        super().__init__(alpha=alpha)
        if not callable(features):
            raise ValueError(
                f"features={features!r}: a callable images (N x 3 x H x W) -> N x C x h x w feature map, "
                "e.g. dalimix.automix.FeatureTap(torchvision.models.resnet50(weights=...), 'layer4')"
            )
        self.features = features
        self.top_k = (
            None if top_k is None else v.integer("top_k", top_k, lo=1, hint=" (cells exchanged; None = from lam)")
        )
        self.patches_from = v.choice("patches_from", patches_from, PATCH_SOURCES)

    def __repr__(self) -> str:
        return (
            f"AttentiveMix(features={type(self.features).__name__}, top_k={self.top_k}, "
            f"patches_from={self.patches_from!r}, alpha={self.alpha})"
        )

    def attention(self, images: torch.Tensor) -> torch.Tensor:
        """N x h x w channel-mean activation of ``features(images)`` (float32)."""
        feats = self.features(images)
        if not isinstance(feats, torch.Tensor) or feats.dim() != 4 or feats.shape[0] != images.shape[0]:
            got = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
            raise ValueError(
                f"AttentiveMix: features(images) returned {got}; it must be N x C x h x w with N = {images.shape[0]}"
            )
        h, w = feats.shape[-2:]
        if h > images.shape[2] or w > images.shape[3]:
            raise ValueError(
                f"AttentiveMix: the feature grid {h} x {w} is finer than the images {tuple(images.shape[2:])}"
            )
        return feats.detach().to(torch.float32).mean(dim=1)

    @torch.no_grad()
    def mask_policy(self, images, lam, partner):
        n = images.shape[0]
        att = self.attention(images)
        h, w = att.shape[-2:]
        cells = h * w
        partner = partner.to(att.device, torch.int64, non_blocking=True)  # device to device
        source = att[partner] if self.patches_from == "partner" else att
        order = torch.argsort(source.reshape(n, cells), dim=1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(cells, device=att.device).expand(n, cells))
        if self.top_k is None:
            share = lam.to(att.device, torch.float64, non_blocking=True)  # device to device
            share = 1.0 - share if self.patches_from == "partner" else share
            k = torch.floor(cells * share).to(torch.int64).clamp(1, cells).view(n, 1)
        else:
            k = torch.full((n, 1), min(self.top_k, cells), dtype=torch.int64, device=att.device)
        chosen = rank < k
        own = ~chosen if self.patches_from == "partner" else chosen
        return own.to(torch.float32).view(n, 1, h, w)


POLICIES = (SaliencyMix, AttentiveMix)
