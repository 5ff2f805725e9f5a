"""AutoMix's two-flow training step around a dalimix loader (Liu et al., "AutoMix: Unveiling the
Power of Mixup for Stronger Classifiers", ECCV 2022; behaviour of OpenMixup's ``AutoMixup``).

Per step, with ``images, targets`` from a loader the ``AutoMix`` is attached to:

- the loader calls ``mask_hook`` for the batch: EMA-encoder features of the CLEAN batch, the Mix
  Block's low-res mask logits for the loader's planned (backbone-flow) lam and partner — no
  gradient — and the fused kernel mixes with ``sigmoid(nearest upsampling)`` of them. Targets use
  the planned lam (``target_lam="planned"``, as AutoMix does); lam within ``mixup_margin`` of 0 or
  1 is plain MixUp (``LearnedMask``'s fallback);
- backbone flow: the online model on the loader's mixed batch, mixup cross-entropy;
- clean flow: the online model on the clean batch (``loader.last_batch.unmixed``), cross-entropy;
- Mix Block flow: a second lam ~ Beta(alpha, alpha) with its own partners, the Mix Block on the
  cached features WITH gradient, the batch mixed differentiably here and classified by the frozen
  EMA model (mixup cross-entropy, or SAMix's η-balanced loss with ``mix_block_loss="eta_balanced"``):
  gradient reaches only the Mix Block; plus the mask loss
  ``w * clamp(|mean(mask) - lam| - margin, 0)`` with ``w`` annealed from 0.1 to 0 by a cosine;
- ``update(progress)`` after the optimiser step: EMA momentum rising by a cosine from 0.999 to
  0.99999, then the EMA update.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import validate as v
from ..hook import LearnedMask
from ..losses import EtaBalancedMixLoss, MixCrossEntropy
from ..mix import CompactTargets, Mixer, pair_indices
from .features import FeatureTap
from .mixblock import UPSAMPLINGS, MixBlock, adjust_to_lam, partner_on
from .momentum import cosine_decay, cosine_rise, ema_update

MIX_BLOCK_LOSSES = ("ce", "eta_balanced")


def mask_spatial_std(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each mask's spatial standard deviation (masks = sigmoid(logits), low
    res; nearest upsampling by an integer factor keeps the std). 0 for a constant mask."""
    m = torch.sigmoid(logits.detach().float()).flatten(1)
    return m.std(dim=1, unbiased=False).mean()


class AutoMix(nn.Module):
    """AutoMix around any torchvision or timm CNN classifier.

    Args (keyword-only):
        model: the classifier to train (images N x 3 x H x W -> logits N x C).
        feature_layer: name of the module whose output feeds the Mix Block (stage 3 in the paper:
            ``"layer3"`` for torchvision/timm ResNets, ``"stages.2"`` for timm ConvNeXt).
        input_size: image size ``(H, W)`` (or an int) for one dry run that finds the channel count.
        alpha: both lams ~ Beta(alpha, alpha) (2.0, the paper's ImageNet setting).
        momentum, end_momentum: EMA momentum at the start and end of training (cosine rise).
        mask_loss_weight, mask_loss_margin: the mask loss ``w * clamp(|mean(mask) - lam| - margin, 0)``,
            ``w`` annealed from ``mask_loss_weight`` to 0 by a cosine.
        mixup_margin: lam within this of 0 or 1 falls back to plain MixUp (0.08).
        reduction, value_from, lam_concat: the Mix Block's (see ``MixBlock``; the defaults are the
            released ImageNet configs, ``lam_concat=False`` the CIFAR ones).
        variant: "automix" (default) or "samix": SAMix's Mix Block (``MixBlock.samix``) and mask loss
            (OpenMixup's "L1+Variance": the L1 term minus twice the masks' variance).
        upsampling: "nearest" (default) or "bilinear": how the Mix Block's h x w logits reach the
            image size, in both flows (OpenMixup's ``unsampling_mode``).
        mask_adjust: probability per step that the backbone flow's masks are rescaled to mean lam
            (``adjust_to_lam``; OpenMixup's ``mask_adjust``, 0 = never).
        switch_off: > 0 trains the Mix Block flow's classification loss only with probability
            ``switch_off * c``, ``c`` a cosine from 1 to 0 over training (OpenMixup's ``switch_off``,
            for faster training; the mask loss stays on). 0 = always.
        mix_block_loss: the Mix Block flow's classification loss: "ce" (default: mixup
            cross-entropy, what AutoMix and OpenMixup's released SAMix configs compute) or
            "eta_balanced" (SAMix's η-balanced mixup loss, ``dalimix.losses.EtaBalancedMixLoss``:
            the two mixed classes' sigmoid cross-entropy plus ``eta`` times the other classes').
        eta: the η of "eta_balanced" (0.5, the paper's and the CIFAR configs' value; 1 = plain
            mixup BCE).
        label_smoothing: for every cross-entropy here and the loader's targets (``mixer()``).
        seed: seed of the Mix Block flow's lam and partners.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        feature_layer: str,
        input_size=224,
        alpha: float = 2.0,
        momentum: float = 0.999,
        end_momentum: float = 0.99999,
        mask_loss_weight: float = 0.1,
        mask_loss_margin: float = 0.1,
        mixup_margin: float = 0.08,
        reduction: int = 2,
        value_from: str = "partner",
        lam_concat: bool = True,
        variant: str = "automix",
        upsampling: str = "nearest",
        mask_adjust: float = 0.0,
        switch_off: float = 0.0,
        mix_block_loss: str = "ce",
        eta: float = 0.5,
        label_smoothing: float = 0.0,
        seed: int = 0,
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module classifier, got {type(model).__name__}")
        momentum = v.number("momentum", momentum, lo=0, hi=1)
        end_momentum = v.number("end_momentum", end_momentum, lo=momentum, hi=1, hint=" (>= momentum)")
        mask_loss_weight = v.number("mask_loss_weight", mask_loss_weight, lo=0)
        mask_loss_margin = v.number("mask_loss_margin", mask_loss_margin, lo=0)
        label_smoothing = v.number("label_smoothing", label_smoothing, lo=0, hi=1, hi_open=True)
        seed = v.integer("seed", seed, lo=0)
        size = v.size("input_size", input_size)
        self.upsampling = v.choice("upsampling", upsampling, UPSAMPLINGS)
        self.variant = v.choice("variant", variant, ("automix", "samix"))
        self.mask_adjust = v.number("mask_adjust", mask_adjust, lo=0, hi=1, hint=" (a probability per step)")
        self.switch_off = v.number("switch_off", switch_off, lo=0, hi=1, hint=" (0 = the Mix Block flow always trains)")
        self.mix_block_loss = v.choice("mix_block_loss", mix_block_loss, MIX_BLOCK_LOSSES)
        self._eta_loss = EtaBalancedMixLoss(eta=eta)  # validates eta
        self.eta = self._eta_loss.eta
        self.mixer_method = LearnedMask(alpha=alpha, mixup_margin=mixup_margin)  # validates alpha and margin
        self.alpha = float(alpha)
        self.base_momentum = float(momentum)
        self.end_momentum = float(end_momentum)
        self.momentum = float(momentum)
        self.base_mask_loss_weight = float(mask_loss_weight)
        self.mask_loss_margin = float(mask_loss_margin)
        self.label_smoothing = float(label_smoothing)
        self.progress = 0.0
        self.model = model
        self.ema = copy.deepcopy(model)
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self._tap = FeatureTap(self.ema, feature_layer)
        self.feature_layer = feature_layer
        if self.variant == "samix":
            self.mix_block = MixBlock.samix(self._channels(size), reduction=reduction, value_from=value_from)
        else:
            self.mix_block = MixBlock(
                self._channels(size), reduction=reduction, value_from=value_from, lam_concat=lam_concat
            )
        self.mix_block.to(self._device())  # once: at construction, not per batch
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 0x417])))
        self._criterion = MixCrossEntropy()
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = (
            None  # (clean images, EMA features) of the batch the hook saw last
        )
        self.last_hook_logits = None

    def _device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _channels(self, size) -> int:
        was = self.ema.training
        self.ema.eval()
        try:
            with torch.no_grad():
                feats = self._tap(torch.zeros(2, 3, *size, device=self._device()))
        except RuntimeError as e:
            raise ValueError(
                f"input_size={size}: the model cannot run images of this size up to "
                f"{self.feature_layer!r} ({str(e).splitlines()[0]}); use the loader's image size"
            ) from None
        finally:
            self.ema.train(was)
        return int(feats.shape[1])

    # --------------------------------------------------------------------- the loader side
    def mixer(self, **kw) -> Mixer:
        """The loader's mixer for AutoMix: ``LearnedMask`` in batch mode (one lam per batch, as in
        the paper) with random partners; keyword arguments override ``Mixer``'s."""
        args: dict[str, Any] = dict(
            methods=[self.mixer_method], mode="batch", pairing="derangement", label_smoothing=self.label_smoothing
        )
        args.update(kw)
        return Mixer(**args)

    def attach(self, loader, *, validate: str = "deferred") -> None:
        """Register ``mask_hook`` on ``loader``: low-res logits, ``upsampling`` and the sigmoid in
        the kernel, targets with the planned lam. ``validate="deferred"`` (the default here)
        checks the logits on the device and reads the result one batch later: no host sync per
        batch on CUDA; non-finite logits are then reported at the next batch (``"eager"``: at
        once, with a sync). On CPU both check at once."""
        loader.set_mask_hook(
            self.mask_hook, interpolation=self.upsampling, logits=True, target_lam="planned", validate=validate
        )

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """EMA-encoder features of ``images`` at ``feature_layer`` (no gradient).

        Images of another floating dtype than the encoder's weights (a loader with
        ``dtype=torch.bfloat16`` or ``float16`` and a float32 model) are cast to the weights' dtype
        first: the hook runs inside the loader, outside the training step's autocast."""
        weight = next((p for p in self.ema.parameters() if p.is_floating_point()), None)
        if weight is not None and images.is_floating_point() and images.dtype != weight.dtype:
            images = images.to(weight.dtype)
        return self._tap(images)

    def _mix_block(self, feats: torch.Tensor, lam, partner) -> torch.Tensor:
        """The Mix Block in float32 whatever autocast is active (its softmax and 1x1 convs are
        tiny; the same math in the hook and in the Mix Block flow)."""
        with torch.autocast(feats.device.type, enabled=False):
            return self.mix_block(feats, lam, partner)

    @torch.no_grad()
    def mask_hook(self, images: torch.Tensor, lam: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
        """The loader's hook: Mix Block logits (N x 1 x h x w, float32) for the backbone flow's lam
        and partner. ``images`` may be float32, float16 or bfloat16 (see ``features``)."""
        feats = self.features(images)
        logits = self._mix_block(feats, lam, partner)
        if self.mask_adjust > 0 and self._rng.random() < self.mask_adjust:
            logits = adjust_to_lam(logits, lam, images.shape[-2:], self.upsampling)
        self._cache = (images, feats)
        self.last_hook_logits = logits
        return logits

    # ------------------------------------------------------------------------ the step
    def forward(self, images: torch.Tensor, targets, batch) -> dict:
        """All AutoMix losses of one step; ``losses["loss"]`` is the sum to back-propagate.

        Args:
            images, targets: what the loader yielded (mixed by the kernel with the hook's mask).
            batch: ``loader.last_batch`` (its ``unmixed`` clean batch and ``labels``).
        """
        clean, labels = batch.unmixed, batch.labels
        if clean is None or labels is None:
            raise ValueError(
                "batch.unmixed/labels are missing: pass loader.last_batch of a loader AutoMix is attached to"
            )
        loss_mix = self._criterion(self.model(images), targets)
        loss_clean = F.cross_entropy(self.model(clean), labels, label_smoothing=self.label_smoothing)
        feats = self._cache[1] if self._cache is not None and self._cache[0] is clean else self.features(clean)
        flow = self.mix_block_flow(clean, labels, feats)
        total = loss_mix + loss_clean + flow["loss_mix_block"] + flow["loss_mask"]
        return dict(
            loss=total,
            loss_mix=loss_mix.detach(),
            loss_clean=loss_clean.detach(),
            loss_mix_block=flow["loss_mix_block"].detach(),
            loss_mask=flow["loss_mask"].detach(),
            lam_mix_block=flow["lam"],
            mask_std=mask_spatial_std(flow["logits"]),
        )

    def mix_block_flow(
        self, clean: torch.Tensor, labels: torch.Tensor, feats: torch.Tensor, *, lam=None, partner=None
    ) -> dict:
        """The Mix Block's loss: its mask mixes the clean batch (differentiably), the frozen EMA model
        classifies it against the mixed labels; plus the annealed mask loss. ``lam``/``partner``
        are drawn (seeded) unless given."""
        n = clean.shape[0]
        lam = float(self._rng.beta(self.alpha, self.alpha)) if lam is None else float(lam)
        if partner is None:
            partner = pair_indices(n, "derangement", self._rng)
        partner = partner_on(partner, clean.device)
        # lam as a device tensor filled there: a Python float would be copied to the GPU with a host sync
        lam_t = torch.full((n,), lam, dtype=torch.float32, device=clean.device)
        logits = self._mix_block(feats, lam_t, partner)
        mask = MixBlock.mask(logits, clean.shape[-2:], self.upsampling)
        x = clean.to(torch.float32)
        mixed = (x[partner] + mask * (x - x[partner])).to(clean.dtype)
        if self.switch_off > 0 and self._rng.random() >= self.switch_off * cosine_decay(1.0, self.progress):
            ce = mask.sum() * 0.0  # switched off this step: no EMA forward pass, no classification loss
        else:
            out = self.ema(mixed)
            eps = self.label_smoothing
            if self.mix_block_loss == "eta_balanced":
                ce = self._eta_loss(out, CompactTargets(labels, labels[partner], lam_t, eps))
            else:
                ce = lam * F.cross_entropy(out, labels, label_smoothing=eps) + (1 - lam) * F.cross_entropy(
                    out, labels[partner], label_smoothing=eps
                )
        weight = cosine_decay(self.base_mask_loss_weight, self.progress)
        gap = torch.clamp((mask.mean() - lam).abs() - self.mask_loss_margin, min=0.0)
        if self.variant == "samix":  # OpenMixup's "L1+Variance": also reward masks that are not flat
            gap = gap - 2.0 * mask.var(unbiased=False)
        return dict(
            loss_mix_block=ce, loss_mask=weight * gap, logits=logits, mask=mask, mixed=mixed, lam=lam, partner=partner
        )

    @torch.no_grad()
    def update(self, progress: float) -> None:
        """After the optimiser step: set the schedules to ``progress`` in [0, 1] (momentum rises by a
        cosine, the mask loss weight decays by one) and move the EMA model towards the model."""
        self.progress = min(max(float(progress), 0.0), 1.0)
        self.momentum = cosine_rise(self.base_momentum, self.end_momentum, self.progress)
        ema_update(self.ema, self.model, self.momentum)

    @property
    def mask_loss_weight(self) -> float:
        return cosine_decay(self.base_mask_loss_weight, self.progress)
