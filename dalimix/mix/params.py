"""Mix parameters of one batch (host side) and the pairings that choose each sample's partner."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..ops.record import METHOD_NONE, RECORD_DTYPE

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


@dataclass
class MixParams:
    """Everything the fused kernel and the targets need to mix one batch of ``n`` samples.

    Per sample ``i``: ``method[i]`` (kernel method id), ``kind[i]`` (index into ``names``: which
    dalimix method, -1 = not mixed), ``partner[i]``, ``lam[i]`` (weight of the sample's own image,
    as the pixel fraction or blend weight), ``target_lam[i]`` (weight of its own label in the
    targets: ``lam`` except for SamplePairing, which keeps the label), ``blend[i]`` (kernel blend
    weight), ``box[i] = (y0, x0, y1, x1)``, ``flags[i]``, ``ints[i]`` (the kernel's p0..p3),
    ``floats[i]`` (its f0), and a mask per MASK sample (``masks[i]``: a 2-D float32 array or None).
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
    device_masks: torch.Tensor | None = None  # N x 1 x h x w masks already on the device (mask hook)
    device_target_lam: torch.Tensor | None = None  # N target lams on the device (mask hook); else target_lam

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

    def mask_pool(self, device) -> torch.Tensor | None:
        """All masks in one flat float32 tensor on ``device`` (the order ``records`` assumes)."""
        unique, seen = [], set()
        for m in self.masks:
            if m is not None and id(m) not in seen:
                seen.add(id(m))
                unique.append(np.asarray(m, dtype=np.float32).reshape(-1))
        device_pool = None if self.device_masks is None else self.device_masks.reshape(-1)
        if not unique:
            return device_pool
        pool = torch.from_numpy(np.concatenate(unique))
        device = torch.device(device)
        if device.type == "cuda":
            pool = pool.pin_memory().to(device, non_blocking=True)
        return pool if device_pool is None else torch.cat([device_pool, pool.to(device_pool.device)])

    def target_lam_tensor(self, device) -> torch.Tensor:
        """Per-sample target lam as float32 on ``device``: ``device_target_lam`` when a mask hook set
        it (no host round trip), else ``target_lam``."""
        if self.device_target_lam is not None:
            return self.device_target_lam.to(device=device, dtype=torch.float32)
        return torch.from_numpy(self.target_lam.astype(np.float32)).to(device, non_blocking=True)
