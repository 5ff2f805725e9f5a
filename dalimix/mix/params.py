"""Mix parameters of one batch (host side) and the pairings that choose each sample's partner."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..ops.record import METHOD_MASK, METHOD_NONE, RECORD_DTYPE
from ..ops.staging import to_device

PAIRINGS = ("flip", "roll", "derangement")
# pairings under which no two samples of a batch (n >= 3) mix the same two images: the partner
# permutation has no fixed point and no 2-cycle (flip is all 2-cycles: i and n-1-i mix one pair)
DISTINCT_PAIRINGS = ("roll", "derangement")


def pair_indices(n: int, pairing: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """Partner of every sample: ``flip`` i <-> n-1-i (timm's ``x.flip(0)``), ``roll`` i -> i-1
    (torchvision's ``roll(1, 0)``), ``derangement`` a random permutation with no fixed point and,
    for n >= 3, no 2-cycle — so no two samples mix the same two images (n = 2 can only swap; n = 1
    pairs the sample with itself)."""
    if pairing == "flip":
        return np.arange(n - 1, -1, -1, dtype=np.int64)
    if pairing == "roll":
        return (np.arange(n, dtype=np.int64) - 1) % max(n, 1)
    if pairing == "derangement":
        if n < 2:
            return np.arange(n, dtype=np.int64)
        if rng is None:
            raise ValueError("pairing='derangement' needs a random generator")
        # a random cyclic shift s of a random permutation: cycles of length n / gcd(n, s), so no
        # fixed point (s != 0) and no 2-cycle (s != n / 2)
        perm = rng.permutation(n)
        if n == 2:
            shift = 1
        else:
            even = n % 2 == 0
            shift = 1 + int(rng.integers(0, n - 1 - even))  # uniform over {1..n-1} without n / 2
            if even and 2 * shift >= n:
                shift += 1
        partner: np.ndarray = np.empty(n, dtype=np.int64)
        partner[perm] = perm[(np.arange(n) + shift) % n]
        return partner
    raise ValueError(f"pairing={pairing!r}: use one of {', '.join(PAIRINGS)}")


def _contiguous_run(arrays: list[np.ndarray]) -> np.ndarray:
    """``np.concatenate(arrays)`` (float32, 1-D), without the copy when they lie back to back in one
    buffer (the masks FMix plans for a batch: views of one array)."""
    first = arrays[0]
    base = first.base if first.base is not None else first
    if isinstance(base, np.ndarray) and base.dtype == np.float32 and base.flags.c_contiguous:
        start = first.__array_interface__["data"][0]
        origin = base.__array_interface__["data"][0]
        address = start
        for a in arrays:
            if a.__array_interface__["data"][0] != address or not a.flags.c_contiguous:
                break
            address += a.nbytes
        else:
            begin = (start - origin) // 4
            return base.reshape(-1)[begin : begin + (address - start) // 4]
    return np.concatenate(arrays)


@dataclass
class DeviceParams:
    """The per-sample arrays of one batch on its device, from one staged copy (``MixParams.stage``).

    Every tensor is a fresh tensor of torch's caching allocator (or a plain CPU tensor): the staging
    ring never writes it again, so targets, losses and a mask hook may keep it.
    """

    device: torch.device
    partner: torch.Tensor  # N int64: the partners, for the targets
    target_lam: torch.Tensor  # N float32: the planned target lam
    host_masks: torch.Tensor | None  # the host masks, flat float32 in ``records()``'s pool order
    labels: torch.Tensor | None = None  # the batch's labels when given to ``stage``
    lam: torch.Tensor | None = None  # N float32 for the mask hook (hook=True)
    hook_partner: torch.Tensor | None = None  # N int64 for the mask hook, its own copy (hook=True)
    use: torch.Tensor | None = None  # N bool: the samples whose mask the hook supplies (hook=True)
    with_masks: bool = True  # host_masks was staged (None then means: no host masks)


@dataclass
class MixParams:
    """Everything the fused kernel and the targets need to mix one batch of ``n`` samples.

    Per sample ``i``: ``method[i]`` (kernel method id), ``kind[i]`` (index into ``names``: which
    dalimix method, -1 = not mixed), ``partner[i]``, ``lam[i]`` (weight of the sample's own image,
    as the pixel fraction or blend weight), ``target_lam[i]`` (weight of its own label in the
    targets: ``lam`` except for SamplePairing, which keeps the label), ``blend[i]`` (kernel blend
    weight), ``box[i] = (y0, x0, y1, x1)``, ``flags[i]``, ``ints[i]`` (the kernel's p0..p3),
    ``floats[i]`` (its f0), and a mask per MASK sample (``masks[i]``: a 2-D float32 array or None).
    ``draws``: what a mask policy drew on the host for this batch, keyed by its method name (e.g.
    ``{"puzzlemix": (gh, gw)}``, PuzzleMix's block grid with ``block_num="random"``), handed to its
    mask hook (``MaskHook(draws=True)``) so that the device side applies the batch's own draw.
    """

    n: int
    names: tuple[str, ...]
    method: np.ndarray
    kind: np.ndarray
    partner: np.ndarray
    lam: np.ndarray
    target_lam: np.ndarray
    blend: np.ndarray
    box: np.ndarray
    flags: np.ndarray
    ints: np.ndarray
    floats: np.ndarray
    masks: list = field(default_factory=list)
    draws: dict = field(default_factory=dict)  # method name -> its host draw of the batch (mask hook)
    device_masks: torch.Tensor | None = None  # N x 1 x h x w masks already on the device (mask hook)
    device_target_lam: torch.Tensor | None = None  # N target lams on the device (mask hook); else target_lam
    staged: DeviceParams | None = field(default=None, repr=False, compare=False)  # set by stage()
    # a CUDA event recorded after ``device_masks`` were written on another stream (FMix(device=...)
    # on the planner thread): ``mask_pool`` makes the consumer's stream wait for it, no host sync
    device_ready: torch.cuda.Event | None = None
    # samples whose mask a method planned on the device (FMix(device=...)), not the mask hook
    device_planned: np.ndarray | None = None
    device_gather: torch.Tensor | None = None  # flat int32 block permutations (FLAG_GATHER; the mask hook)

    @classmethod
    def unmixed(cls, n: int, names: tuple[str, ...] = ()) -> MixParams:
        """``n`` samples, none mixed (partner = self, lam = 1)."""
        return cls(
            n=n,
            names=tuple(names),
            method=np.full(n, METHOD_NONE, dtype=np.int32),
            kind=np.full(n, -1, dtype=np.int16),
            partner=np.arange(n, dtype=np.int64),
            lam=np.ones(n, dtype=np.float64),
            target_lam=np.ones(n, dtype=np.float64),
            blend=np.ones(n, dtype=np.float32),
            box=np.zeros((n, 4), dtype=np.int32),
            flags=np.zeros(n, dtype=np.int32),
            ints=np.zeros((n, 4), dtype=np.int32),
            floats=np.zeros(n, dtype=np.float32),
            masks=[None] * n,
        )

    def method_name(self, i: int) -> str:
        k = int(self.kind[i])
        return self.names[k] if k >= 0 else "none"

    def records(self) -> np.ndarray:
        """The kernel's per-sample records (``RECORD_DTYPE``), mask offsets into ``mask_pool``."""
        rec: np.ndarray = np.zeros(self.n, dtype=RECORD_DTYPE)
        rec["partner"] = self.partner
        rec["method"] = self.method
        rec["lam"] = self.blend
        rec["flags"] = self.flags
        rec["y0"], rec["x0"], rec["y1"], rec["x1"] = self.box.T
        rec["p0"], rec["p1"], rec["p2"], rec["p3"] = self.ints.T
        rec["f0"] = self.floats
        offset = 0
        if self.device_masks is not None:  # sample i -> device mask i, host masks after them
            _, _, mh, mw = self.device_masks.shape
            rec["mask_offset"] = np.arange(self.n) * mh * mw
            rec["mask_h"], rec["mask_w"] = mh, mw
            offset = self.n * mh * mw
        seen: dict[int, int] = {}
        for i, m in enumerate(self.masks):
            if m is None:
                continue
            key = id(m)
            if key not in seen:  # samples sharing one mask array share its pool slot
                seen[key] = offset
                offset += m.size
            rec["mask_offset"][i] = seen[key]
            rec["mask_h"][i], rec["mask_w"][i] = m.shape
        return rec

    def hooked(self) -> np.ndarray:
        """N bools: the samples whose mask the mask hook supplies (method MASK without a host mask,
        not planned on the device by their method, ``FMix(device=...)``)."""
        hooked = (self.method == METHOD_MASK) & np.array([m is None for m in self.masks], dtype=bool)
        if self.device_planned is not None:
            hooked &= ~self.device_planned
        return hooked

    def _host_masks(self) -> list[np.ndarray]:
        """The distinct host masks, flat float32, in the pool order ``records`` assumes."""
        unique, seen = [], set()
        for m in self.masks:
            if m is not None and id(m) not in seen:
                seen.add(id(m))
                unique.append(np.asarray(m, dtype=np.float32).reshape(-1))
        return unique

    def device_params(
        self, device, *, labels: np.ndarray | None = None, hook: bool = False, masks: bool = True
    ) -> DeviceParams:
        """The batch's per-sample arrays on ``device``: ``staged`` when it covers the request, else
        staged now (``dalimix.ops.staging.to_device``; not kept on ``self``): the per-sample arrays in
        one copy, the host masks (if any; ``masks=False`` leaves them out) in a second one of their
        own, so a kept lam or label never holds a batch's mask pool alive."""
        device = torch.device(device)
        have = self.staged
        if (
            have is not None
            and have.device == device
            and (labels is None or have.labels is not None)
            and (not hook or have.lam is not None)
            and (not masks or have.with_masks)
        ):
            return have
        groups: list = [self.partner.astype(np.int64, copy=False), self.target_lam.astype(np.float32)]
        if labels is not None:
            groups.append(np.asarray(labels))
        if hook:
            groups += [self.lam.astype(np.float32), self.partner.astype(np.int64), self.hooked()]
        t = to_device(groups, device)
        host = self._host_masks() if masks else []
        out = DeviceParams(
            device=device,
            partner=t[0],
            target_lam=t[1],
            host_masks=to_device([host], device)[0] if host else None,
            with_masks=masks,
        )
        if labels is not None:
            out.labels = t[2]
        if hook:
            out.lam, out.hook_partner, out.use = t[-3:]
        return out

    def stage(self, device, *, labels: np.ndarray | None = None, hook: bool = False) -> DeviceParams:
        """Copy the batch's per-sample arrays (partner, target lam; ``labels``; the mask hook's
        lam/partner/rows with ``hook=True``) to ``device`` in ONE asynchronous copy, and its host
        masks (FMix and the like) in one more, and keep them as ``self.staged``, which ``mask_pool``,
        ``target_lam_tensor``, ``partner_tensor`` and the hook then read. Call it once the plan is
        final; set ``staged = None`` after the batch."""
        self.staged = None
        self.staged = self.device_params(device, labels=labels, hook=hook)
        return self.staged

    def mask_pool(self, device) -> torch.Tensor | None:
        """All masks in one flat float32 tensor on ``device`` (the order ``records`` assumes)."""
        device_pool = None if self.device_masks is None else self.device_masks.reshape(-1)
        if self.device_ready is not None and device_pool is not None and device_pool.is_cuda:
            stream = torch.cuda.current_stream(device_pool.device)
            stream.wait_event(self.device_ready)
            device_pool.record_stream(stream)  # the planner's allocation stays valid until this stream is done
        device = torch.device(device)
        have = self.staged
        if have is not None and have.device == device and have.with_masks:
            pool = have.host_masks
        else:
            masks = self._host_masks()
            if not masks:
                pool = None
            elif device.type == "cuda":
                pool = to_device([masks], device)[0]
            else:  # the kernel reads them at once: FMix's one buffer for the batch, not a copy
                pool = torch.from_numpy(_contiguous_run(masks))
        if pool is None:
            return device_pool
        return pool if device_pool is None else torch.cat([device_pool, pool])

    def partner_tensor(self, device) -> torch.Tensor:
        """The partners as int64 on ``device`` (``staged`` when it is there; else one staged copy)."""
        return self.device_params(device, masks=False).partner

    def target_lam_tensor(self, device, staged: DeviceParams | None = None) -> torch.Tensor:
        """Per-sample target lam as float32 on ``device``: ``device_target_lam`` when a mask hook set
        it (no host round trip), else ``target_lam`` (from ``staged``, ``self.staged`` when it is on
        ``device``, else one staged copy)."""
        if self.device_target_lam is not None:
            return self.device_target_lam.to(device=device, dtype=torch.float32, non_blocking=True)  # device to device
        return (staged or self.device_params(device, masks=False)).target_lam
