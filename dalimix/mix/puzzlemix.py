"""PuzzleMix (Kim, Choo, Song, "Puzzle Mix: Exploiting Saliency and Local Statistics for Optimal
Mixup", ICML 2020) as a mask policy: the mask hook plans each sample's mask and both images' block
transports on the device's unmixed batch; the fused kernel mixes (nearest mask, ``FLAG_GATHER`` and
``FLAG_GATHER_SELF``).

Per sample, on a ``gh x gw`` block grid (blocks from the integer boundaries ``floor(i H / gh)``):

- unary term: the saliency pooled to the grid and normalised to sum 1 (``s_own``, ``s_partner``);
  a block kept from the sample's own image (mask 1) costs the partner's saliency lost there, and
  ``-eta log(lam) / K``; a block from the partner costs ``s_own`` and ``-eta log(1 - lam) / K``
  (``K = gh gw``; the paper's prior, ``lam ~ Beta(alpha, alpha)``);
- pairwise term between 4-neighbour blocks: ``beta' [m_a != m_b]`` (label smoothness) plus
  ``beta' gamma D(m_a, m_b)`` (data local smoothness: the mean absolute difference, on the 0..1
  scale, between the ``neigh_size`` rows / columns of the two images that meet at the boundary);
  ``beta' = beta / (16 sqrt(K))`` (the official code's ``beta / block_num / 16``);
- the mask minimises the sum (``minimise_energy``): an exact s-t minimum cut of the binary labels
  (scipy's ``maximum_flow``; capacities quantised to integers with 2^30 / total resolution); a
  pairwise table that is not submodular (rare: the images differ less across than within the
  boundary) has its negative Potts weight dropped — the minimum of that energy is returned;
- multi-label masks (``n_labels = L >= 3``; the paper's default is 3): label k gives the own image
  the weight ``x_k = k / (L - 1)`` (0, 1/2, 1 for L = 3; the partner gets ``1 - x_k``). The energy
  (``label_energy``) generalises the binary one to weights:

      E(k) = sum_b [x_b s_partner(b) + (1 - x_b) s_own(b)
                    - eta log(C(L-1, k_b) lam^k_b (1 - lam)^(L-1-k_b) + 1e-8) / K]
           + sum_(a,b) P_ab(x_a, x_b),
      P(x, y) = t00 + (t10 - t00 - w) x + (t01 - t00 - w) y + w (x - y)^2,  w = (t01 + t10 - t00 - t11) / 2

  (``t`` the edge's binary table above: ``beta' [m_a != m_b]`` becomes ``beta' (x_a - x_b)^2``,
  the data term is bilinear in the weights up to ``-w_D (x (1 - x) + y (1 - y))``; the prior: the
  own weight ~ Binomial(L - 1, lam) / (L - 1); all three as in the official code); L = 2 is the
  binary energy. It is minimised by alpha-beta swap moves (``swap_minimise``, Boykov, Veksler,
  Zabih 2001): each move relabels the blocks labelled alpha or beta with one binary cut of the
  same max-flow construction, kept if the energy drops, until no pair improves (at most
  ``SWAP_SWEEPS`` sweeps); the result is a local minimum for every swap move and (submodular
  tables, ``gamma <= 1``) never worse than the best 0/1 mask of the same energy (the first move),
  not the global minimum (NP-hard for L > 2;
  on tiny grids it was the global one in about 95 % of random cases). Cost: about 2.3 cuts per
  sample at L = 3 (one at L = 2); the planning table in benchmarks/bench_mix.py has both;
- transport (``transport=True``): both images' blocks are permuted (``transport_plan``), the
  partner's to maximise the partner saliency landing where the partner shows (``1 - mask``:
  weighted, 1/2 where the weight is 1/2), the own image's likewise where it shows (the mask), each
  minus ``t_eps`` times the squared block distance (normalised by ``(max(gh, gw) - 1)^2``): exact
  assignments (``scipy.optimize.linear_sum_assignment``) on the ``t_size`` grid (default: the mask
  grid), read by the kernel in the same pass (``FLAG_GATHER`` and ``FLAG_GATHER_SELF``);
- ``lam`` of the targets = the mask mean (the loader's mask hook: exactly the own image's share).

Differences from the official code: ``n_labels=2`` by default (binary masks, one exact cut per
sample: the cheapest, and what earlier versions gave; pass ``n_labels=3`` for the paper's
default); exact min-cut and assignment, and our own swap loop from all-zero labels, the pair
(0, L-1) first (the code uses gco's swap and a greedy transport); the transport weights the partner
saliency by how much each image shows (the code: wherever it shows at all); one block grid
by default (``block_num="random"`` draws it per batch as the code does, ``2 ** randint(1, 5)``: an
n x n grid, n uniform over ``block_choices = (2, 4, 8, 16)``; here on the host when the batch is
planned, from the plan's generator, so resumed and re-seeded runs draw the same grids). The
saliency is a callable you give: the paper's is the gradient of the loss w.r.t. the input
(``GradientSaliency(model)``); the default, needing no model, is the spectral residual of
``dalimix.mix.saliency``.

    mix = Mixer(methods=[PuzzleMix(block_num=4, n_labels=3)], num_classes=1000)
    loader = ImageLoader(root="train/", batch_size=256, size=224, device="cuda", mix=mix)
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .. import validate as v
from .._optional import require
from .saliency import MaskPolicy, spectral_residual

CAPACITY_BUDGET = 2**30  # integer capacities of one sample's graph sum to at most this
BLOCK_CHOICES = (2, 4, 8, 16)  # block_num="random": the official code's 2 ** randint(1, 5)


# ------------------------------------------------------------------------------ block grids
def block_index(n: int, g: int, device=None) -> torch.Tensor:
    """Block of every pixel 0..n-1 of a grid of ``g`` blocks: blocks are ``[floor(i n / g),
    floor((i + 1) n / g))`` (the kernel's ``FLAG_GATHER`` rule)."""
    return ((torch.arange(n, device=device) + 1) * g - 1) // n


def nearest_is_blocks(n: int, g: int) -> bool:
    """Whether the kernel's nearest upsampling of ``g`` mask cells to ``n`` pixels (F.interpolate's
    float32 rule) puts every pixel in the block ``block_index`` gives it."""
    scale = np.float32(g) / np.float32(n)
    idx = np.minimum(np.floor(np.arange(n, dtype=np.float32) * scale).astype(np.int64), g - 1)
    return bool(np.array_equal(idx, block_index(n, g).numpy()))


def block_means(x: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """``x`` (N x H x W) averaged over the blocks of a ``gh x gw`` grid: N x gh x gw float64."""
    n, h, w = x.shape
    by, bx = block_index(h, gh, x.device), block_index(w, gw, x.device)
    rows = torch.zeros(n, gh, w, dtype=torch.float64, device=x.device).index_add_(1, by, x.to(torch.float64))
    sums = torch.zeros(n, gh, gw, dtype=torch.float64, device=x.device).index_add_(2, bx, rows)
    count = torch.bincount(by, minlength=gh).view(gh, 1) * torch.bincount(bx, minlength=gw).view(1, gw)
    return sums / count.to(torch.float64)


def boundary_strips(x: torch.Tensor, g: int, depth: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For the g-1 inner block boundaries of ``x`` (N x C x H x W) along ``dim`` (2: rows, 3:
    columns): the mean of the ``depth`` rows (columns) before and after each boundary, clipped to
    the two blocks; N x C x (g-1) x (the other side's length) each, float64."""
    n = x.shape[dim]
    starts = [i * n // g for i in range(g + 1)]
    before, after = [], []
    for i in range(1, g):
        b = starts[i]
        lo, hi = max(starts[i - 1], b - depth), min(starts[i + 1], b + depth)
        before.append(x.narrow(dim, lo, b - lo).mean(dim, dtype=torch.float64))
        after.append(x.narrow(dim, b, hi - b).mean(dim, dtype=torch.float64))
    if not before:
        shape = list(x.shape)
        del shape[dim]
        empty = x.new_zeros((shape[0], shape[1], 0, shape[2]), dtype=torch.float64)
        return empty, empty
    return torch.stack(before, 2), torch.stack(after, 2)


def strip_differences(strips: tuple, partner: torch.Tensor, g_other: int) -> torch.Tensor:
    """``D[la, lb]`` (2 x 2 x N x (g-1) x g_other) from one batch's ``boundary_strips`` and the
    partner of every sample: label 1 = the sample's own image, 0 = its partner's."""
    before, after = strips
    n, _, cuts, length = before.shape
    sides = ((before[partner], after[partner]), (before, after))  # [label][before / after]
    out = before.new_zeros((2, 2, n, cuts, g_other))
    if cuts == 0:
        return out
    for la in range(2):
        for lb in range(2):
            diff = (sides[la][0] - sides[lb][1]).abs().mean(1)  # N x cuts x length
            out[la, lb] = block_means(diff.reshape(n * cuts, 1, length), 1, g_other).view(n, cuts, g_other)
    return out


def boundary_differences(own: torch.Tensor, partner: torch.Tensor, gh: int, gw: int, depth: int):
    """The data local smoothness of PuzzleMix: ``(dv, dh)`` float64, ``dv[la, lb]`` (2 x 2 x N x
    (gh-1) x gw) for the boundary between block (i, j) with label ``la`` and (i+1, j) with label
    ``lb`` (label 1 = own image, 0 = partner), ``dh`` (2 x 2 x N x gh x (gw-1)) likewise across
    columns: the mean over the boundary and the channels of ``|A - B|``, A and B the means of the
    ``depth`` rows (columns) of the two images on either side. ``partner``: the partners' images."""
    n = own.shape[0]
    both = torch.cat([own, partner])
    index = torch.arange(n, 2 * n, device=own.device).repeat(2)  # sample i's partner is row n + i
    dv = strip_differences(boundary_strips(both, gh, depth, 2), index, gw)[:, :, :n]
    dh = strip_differences(boundary_strips(both, gw, depth, 3), index, gh)[:, :, :n].transpose(3, 4)
    return dv, dh


# ------------------------------------------------------------------------------ the objective
def unary_costs(s_own: np.ndarray, s_partner: np.ndarray, lam: float, eta: float) -> tuple[np.ndarray, np.ndarray]:
    """``(cost of label 0 = partner, cost of label 1 = own)`` per block (gh x gw float64)."""
    k = s_own.size
    prior_own = -eta * math.log(lam + 1e-8) / k
    prior_partner = -eta * math.log(1.0 - lam + 1e-8) / k
    return s_own + prior_partner, s_partner + prior_own


def puzzle_energy(mask: np.ndarray, u0, u1, pv: np.ndarray, ph: np.ndarray) -> float:
    """The energy of a 0/1 ``mask`` (gh x gw, 1 = own): unary ``u0`` / ``u1`` plus the pairwise
    tables ``pv[la, lb]`` ((gh-1) x gw) and ``ph[la, lb]`` (gh x (gw-1))."""
    m: np.ndarray = mask.astype(np.int64)
    e = float(np.where(m == 1, u1, u0).sum())
    if m.shape[0] > 1:
        e += float(pv[m[:-1], m[1:], np.arange(m.shape[0] - 1)[:, None], np.arange(m.shape[1])[None, :]].sum())
    if m.shape[1] > 1:
        e += float(ph[m[:, :-1], m[:, 1:], np.arange(m.shape[0])[:, None], np.arange(m.shape[1] - 1)[None, :]].sum())
    return e


def pairwise_tables(dv: np.ndarray, dh: np.ndarray, beta: float, gamma: float):
    """PuzzleMix's pairwise tables from the boundary differences: ``beta [la != lb] + beta gamma D``."""
    potts = np.array([[0.0, 1.0], [1.0, 0.0]])
    pv, ph = (beta * potts.reshape((2, 2) + (1,) * (d.ndim - 2)) + beta * gamma * d for d in (dv, dh))
    return pv, ph


def minimise_energy(u0: np.ndarray, u1: np.ndarray, pv: np.ndarray, ph: np.ndarray) -> np.ndarray:
    """The 0/1 mask (gh x gw) of least ``puzzle_energy``, by an s-t minimum cut.

    Each pairwise table is split into unary parts and a Potts weight ``w = (t01 + t10 - t00 - t11) / 2``
    (exact for binary labels); where ``w < 0`` (not submodular) it is set to 0. Capacities are
    quantised to integers summing to at most ``CAPACITY_BUDGET`` (scipy's max-flow is integral).
    """
    gh, gw = u0.shape
    k = gh * gw
    a0 = np.array(u0, dtype=np.float64).reshape(-1).copy()
    a1 = np.array(u1, dtype=np.float64).reshape(-1).copy()
    idx = np.arange(k).reshape(gh, gw)
    ea, eb, ew = [], [], []
    for table, left, right in ((pv, idx[:-1], idx[1:]), (ph, idx[:, :-1], idx[:, 1:])):
        if left.size == 0:
            continue
        t00, t01, t10, t11 = (table[i, j].reshape(-1) for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
        la, lb = left.reshape(-1), right.reshape(-1)
        ea.append(la)
        eb.append(lb)
        ew.append(split_pairwise(a1, la, lb, t00, t01, t10, t11))
    ea_, eb_, ew_ = (np.concatenate(x) if x else np.zeros(0) for x in (ea, eb, ew))
    return binary_cut(a0, a1, ea_, eb_, ew_).reshape(gh, gw).astype(np.float32)


def split_pairwise(a1: np.ndarray, la: np.ndarray, lb: np.ndarray, t00, t01, t10, t11) -> np.ndarray:
    """Write the binary pairwise tables ``t(i, j) = t00 + B i + C j + w [i != j]`` of the edges
    ``(la, lb)`` as unary parts (``B``, ``C`` added to the label-1 costs ``a1`` in place; ``t00`` is
    a constant) and Potts weights: returns ``max(w, 0)``, ``w = (t01 + t10 - t00 - t11) / 2`` (a
    negative ``w``, not submodular, is dropped)."""
    np.add.at(a1, la, (t11 - t00 + t10 - t01) / 2)
    np.add.at(a1, lb, (t11 - t00 - t10 + t01) / 2)
    return np.maximum((t01 + t10 - t00 - t11) / 2, 0.0)


def binary_cut(a0: np.ndarray, a1: np.ndarray, ea: np.ndarray, eb: np.ndarray, ew: np.ndarray) -> np.ndarray:
    """The s-t minimum cut of ``sum_b a_{x_b}(b) + sum_e ew_e [x_ea != x_eb]`` over binary ``x``
    (``a0``, ``a1``: the k nodes' costs of label 0 / 1; ``ew >= 0``: the edges' Potts weights):
    bool k, True = label 1. Capacities are quantised to integers summing to at most
    ``CAPACITY_BUDGET`` (scipy's max-flow is integral)."""
    csgraph = require("scipy.sparse.csgraph", "puzzlemix", "PuzzleMix's min-cut")
    sparse = require("scipy.sparse", "puzzlemix", "PuzzleMix's min-cut")
    k = a0.size
    base = np.minimum(a0, a1)
    a0, a1 = a0 - base, a1 - base
    total = a0.sum() + a1.sum() + 2 * ew.sum()
    if total <= 0:
        return a1 <= a0
    scale = CAPACITY_BUDGET / total
    q = lambda x: np.rint(x * scale).astype(np.int32)  # noqa: E731
    s, t = k, k + 1
    # label 1 = the source side: s -> b is cut when b takes label 0 (cost a0), b -> t when label 1
    rows = np.concatenate([np.full(k, s), np.arange(k), ea, eb]).astype(np.int32)
    cols = np.concatenate([np.arange(k), np.full(k, t), eb, ea]).astype(np.int32)
    caps = np.concatenate([q(a0), q(a1), q(ew), q(ew)])
    graph = sparse.csr_matrix((caps, (rows, cols)), shape=(k + 2, k + 2))
    flow = csgraph.maximum_flow(graph, s, t)
    residual = graph - flow.flow  # reachable from s in the residual graph = the source side
    residual.data = np.maximum(residual.data, 0)
    residual.eliminate_zeros()
    order = csgraph.breadth_first_order(residual, s, directed=True, return_predecessors=False)
    own: np.ndarray = np.zeros(k + 2, dtype=bool)
    own[order] = True
    return own[:k]


# ------------------------------------------------------------------------------ multi-label masks
SWAP_SWEEPS = 10  # alpha-beta swap: at most this many sweeps over the label pairs


def label_values(n_labels: int) -> np.ndarray:
    """The own image's weight of every label: ``x_k = k / (L - 1)``, k = 0..L-1 (float64)."""
    out: np.ndarray = np.arange(n_labels, dtype=np.float64) / (n_labels - 1)
    return out


def label_unary_costs(s_own: np.ndarray, s_partner: np.ndarray, lam: float, eta: float, n_labels: int) -> np.ndarray:
    """``U[k]`` (L x gh x gw float64): the cost of label k (own weight ``x = k / (L - 1)``) per block,
    ``x s_partner + (1 - x) s_own - eta log(C(L-1, k) lam^k (1 - lam)^(L-1-k) + 1e-8) / K`` (the
    saliency each image loses, weighted; the prior: the own weight ~ Binomial(L - 1, lam) / (L - 1),
    the official code's). ``n_labels=2`` gives ``unary_costs``."""
    size = s_own.size
    x = label_values(n_labels)
    m = n_labels - 1
    prior: np.ndarray = np.array(
        [-eta * math.log(math.comb(m, k) * lam**k * (1.0 - lam) ** (m - k) + 1e-8) / size for k in range(n_labels)]
    )
    out: np.ndarray = x[:, None, None] * s_partner[None] + (1.0 - x)[:, None, None] * s_own[None]
    return out + prior[:, None, None]


def grid_edges(pv: np.ndarray, ph: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 4-neighbour edges of the grid: ``(ea, eb, tables)``, ``ea`` / ``eb`` (E, flat block
    indices: the upper / left block first), ``tables`` (4 x E: ``t00, t01, t10, t11``, vertical
    edges first)."""
    gh, gw = ph.shape[2], pv.shape[3]
    idx = np.arange(gh * gw).reshape(gh, gw)
    ea = np.concatenate([idx[:-1].reshape(-1), idx[:, :-1].reshape(-1)])
    eb = np.concatenate([idx[1:].reshape(-1), idx[:, 1:].reshape(-1)])
    tables: np.ndarray = np.stack(
        [np.concatenate([pv[i, j].reshape(-1), ph[i, j].reshape(-1)]) for i, j in ((0, 0), (0, 1), (1, 0), (1, 1))]
    )
    return ea, eb, tables


def label_pairwise(tables: np.ndarray, x, y) -> np.ndarray:
    """``P(x, y) = t00 + (t10 - t00 - w) x + (t01 - t00 - w) y + w (x - y)^2``, ``w = (t01 + t10 -
    t00 - t11) / 2``: a binary pairwise table (4 x E, ``grid_edges``) at own weights ``x`` (upper /
    left block) and ``y``. It is the table at 0/1 weights; the Potts part ``beta' [x != y]`` becomes
    ``beta' (x - y)^2`` (the official code's squared label difference) and the data term, being
    linear in the table, is bilinear in ``(x, y)`` up to ``-w_D (x (1 - x) + y (1 - y))``."""
    t00, t01, t10, t11 = tables
    w = (t01 + t10 - t00 - t11) / 2
    out: np.ndarray = t00 + (t10 - t00 - w) * x + (t01 - t00 - w) * y + w * (x - y) ** 2
    return out


def label_energy(labels: np.ndarray, unary: np.ndarray, pv: np.ndarray, ph: np.ndarray) -> float:
    """The multi-label energy ``E(k) = sum_b U[k_b, b] + sum_(a,b) P_ab(x_(k_a), x_(k_b))`` of the
    integer ``labels`` (gh x gw, 0..L-1; own weight ``x_k = k / (L - 1)``): ``unary`` (L x gh x gw,
    ``label_unary_costs``), the binary tables ``pv`` / ``ph`` extended by ``label_pairwise``. With
    L = 2 it is ``puzzle_energy`` of the 0/1 mask."""
    lab: np.ndarray = np.asarray(labels, dtype=np.int64).reshape(-1)
    n_labels = unary.shape[0]
    return _label_energy(lab, unary.reshape(n_labels, -1), *grid_edges(pv, ph))


def _label_energy(labels: np.ndarray, unary: np.ndarray, ea: np.ndarray, eb: np.ndarray, tables: np.ndarray) -> float:
    """``label_energy`` of the flat labels (k), ``unary`` L x k, the edges of ``grid_edges``."""
    x = label_values(unary.shape[0])[labels]
    e = float(unary[labels, np.arange(labels.size)].sum())
    return e + float(label_pairwise(tables, x[ea], x[eb]).sum())


def swap_move(labels: np.ndarray, alpha: int, beta: int, unary: np.ndarray, ea, eb, tables) -> np.ndarray | None:
    """The best alpha-beta swap of the flat ``labels`` (k int64; ``unary``: L x k, the edges:
    ``grid_edges``): every block labelled alpha or
    beta may take either, the others stay; one binary cut (``binary_cut``: label 1 = beta) whose
    unary costs hold the edges to the fixed neighbours. None when no block has either label. Exact
    when the moved pairs are submodular (``w >= 0``; else the negative Potts weights are dropped)."""
    moving = (labels == alpha) | (labels == beta)
    nodes = np.flatnonzero(moving)
    if nodes.size == 0:
        return None
    local: np.ndarray = np.full(labels.size, -1, dtype=np.int64)
    local[nodes] = np.arange(nodes.size)
    xs = label_values(unary.shape[0])
    xa, xb = xs[alpha], xs[beta]
    x = xs[labels]
    c0: np.ndarray = unary[alpha, nodes].copy()
    c1: np.ndarray = unary[beta, nodes].copy()
    ma, mb = moving[ea], moving[eb]
    out = ma & ~mb  # the upper / left block moves, its neighbour is fixed
    np.add.at(c0, local[ea[out]], label_pairwise(tables[:, out], xa, x[eb[out]]))
    np.add.at(c1, local[ea[out]], label_pairwise(tables[:, out], xb, x[eb[out]]))
    out = ~ma & mb
    np.add.at(c0, local[eb[out]], label_pairwise(tables[:, out], x[ea[out]], xa))
    np.add.at(c1, local[eb[out]], label_pairwise(tables[:, out], x[ea[out]], xb))
    inner = ma & mb
    la, lb, t = local[ea[inner]], local[eb[inner]], tables[:, inner]
    q = [label_pairwise(t, xu, xv) for xu, xv in ((xa, xa), (xa, xb), (xb, xa), (xb, xb))]
    ew = split_pairwise(c1, la, lb, *q)
    to_beta = binary_cut(c0, c1, la, lb, ew)
    new = labels.copy()
    new[nodes] = np.where(to_beta, beta, alpha)
    return new


def swap_minimise(unary: np.ndarray, pv: np.ndarray, ph: np.ndarray, *, max_sweeps: int = SWAP_SWEEPS) -> np.ndarray:
    """Integer labels (gh x gw, 0..L-1) that no alpha-beta swap improves (``label_energy``), by
    Boykov, Veksler and Zabih's swap moves: from all blocks at label 0, the pairs (0, L-1) first
    (an exact cut when the tables are submodular, e.g. ``gamma <= 1``: the result is then never
    worse than the best mask using only weights 0 and 1), then the others;
    a move is kept only if the energy drops; a pair is skipped while nothing changed since it was
    last solved; stops after a sweep with no change, or ``max_sweeps`` sweeps.

    A local minimum, not the global one (multi-label minimisation is NP-hard); the literature's
    factor-2c bound is the alpha-expansion's, for metric smoothness terms: it is not guaranteed
    for swap moves, nor for this energy."""
    n_labels, gh, gw = unary.shape
    ea, eb, tables = grid_edges(pv, ph)
    flat = unary.reshape(n_labels, gh * gw)
    labels: np.ndarray = np.zeros(gh * gw, dtype=np.int64)
    energy = _label_energy(labels, flat, ea, eb, tables)
    last = n_labels - 1
    pairs = [(0, last)] + [(a, b) for a in range(n_labels) for b in range(a + 1, n_labels) if (a, b) != (0, last)]
    solved = dict.fromkeys(pairs, -1)
    step = changed = 0
    for _ in range(max_sweeps):
        improved = False
        for pair in pairs:
            if solved[pair] >= changed:  # its subproblem is unchanged since it was solved
                continue
            step += 1
            solved[pair] = step
            new = swap_move(labels, *pair, flat, ea, eb, tables)
            if new is None:
                continue
            e = _label_energy(new, flat, ea, eb, tables)
            if e < energy - 1e-12 * (1.0 + abs(energy)):
                labels, energy, changed, improved = new, e, step, True
        if not improved:
            break
    return labels.reshape(gh, gw)


def transport_cost(gh: int, gw: int) -> np.ndarray:
    """Squared distance between the blocks of a gh x gw grid, over ``(max(gh, gw) - 1)^2`` (K x K)."""
    yy, xx = np.divmod(np.arange(gh * gw), gw)
    d = (yy[:, None] - yy[None, :]) ** 2 + (xx[:, None] - xx[None, :]) ** 2
    return d / max(max(gh, gw) - 1, 1) ** 2


def transport_plan(saliency: np.ndarray, shows: np.ndarray, t_eps: float) -> np.ndarray:
    """For every output block j, the source block of the partner: the permutation maximising
    ``sum_j saliency[perm[j]] shows[j] - t_eps cost(perm[j], j)`` (an exact assignment).

    ``saliency``: the partner's pooled saliency (gh x gw); ``shows``: how much of each output block
    shows the partner (1 - the mask, gh x gw). Returns gh*gw int64."""
    optimize = require("scipy.optimize", "puzzlemix", "PuzzleMix's transport")
    gh, gw = saliency.shape
    cost = t_eps * transport_cost(gh, gw) - saliency.reshape(-1, 1) * shows.reshape(1, -1)  # source x dest
    src, dst = optimize.linear_sum_assignment(cost)
    perm = np.empty(gh * gw, dtype=np.int64)
    perm[dst] = src
    return perm


# ------------------------------------------------------------------------------ saliency
class GradientSaliency:
    """The paper's saliency: ``sqrt(mean_c (d loss / d x)^2)`` of ``model`` on the unmixed batch
    (one extra forward and backward; the model's parameters are not updated, their gradients are
    left untouched). ``loss(logits, labels)``: cross entropy by default."""

    def __init__(self, model, *, loss=None):
        if not callable(model):
            raise ValueError(f"model={model!r}: a callable images -> logits (an nn.Module)")
        self.model = model
        self.loss = loss or F.cross_entropy

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = images.detach().to(torch.float32).requires_grad_(True)
            (grad,) = torch.autograd.grad(self.loss(self.model(x), labels), [x])
        return grad.pow(2).mean(dim=1).sqrt()


class PuzzleMix(MaskPolicy):
    """PuzzleMix (Kim et al., ICML 2020): saliency-guided graph-cut masks with the partner's blocks
    transported (see the module's docstring for the objective and the differences from the code).

    Args:
        alpha: ``lam ~ Beta(alpha, alpha)`` (the prior's mixing ratio).
        block_num: the mask's block grid, ``n`` (n x n) or ``(gh, gw)`` (capped by the image size),
            or ``"random"``: an n x n grid per batch, n uniform over ``block_choices`` (the official
            code's draw), drawn on the host when the batch is planned (``MixParams.draws``).
        block_choices: the grid sizes ``block_num="random"`` draws from (positive ints; default
            2, 4, 8, 16); only with ``block_num="random"``.
        beta: label smoothness (1.2 in the paper's code); gamma: data local smoothness (0.5);
        eta: weight of the prior on lam (0.2); neigh_size: rows / columns each side of a block
        boundary that the data term compares (4).
        n_labels: an int L >= 2, the own image's weights ``k / (L - 1)``: 2 (default) binary masks
            by one exact min-cut per sample; 3 (the paper's default) weights 0, 1/2, 1 by alpha-beta
            swap moves (a local minimum, about 2.3 cuts per sample); 2 stays the default for its
            cost and for the binary masks it has always given.
        transport: permute both images' blocks (True); t_eps: transport cost weight (0.8);
        t_size: transport block size in pixels (None: the mask grid; smaller = a finer grid).
        saliency: ``fn(images, labels) -> N x H x W`` (larger = more salient), e.g.
            ``GradientSaliency(model)``; None: the spectral residual of the de-normalised images.
    """

    name = "puzzlemix"
    # masks in [0, 1], checked one batch later on the GPU; the hook gets the labels (a loss-gradient saliency)
    # draws: the hook gets the batch's block grid (block_num="random"), drawn in fill
    hook_options = dict(
        interpolation="nearest", logits=False, target_lam="mask", validate="deferred", labels=True, draws=True
    )

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        block_num=4,
        block_choices=None,
        beta: float = 1.2,
        gamma: float = 0.5,
        eta: float = 0.2,
        neigh_size: int = 4,
        n_labels: int = 2,
        transport: bool = True,
        t_eps: float = 0.8,
        t_size: int | None = None,
        saliency=None,
    ):
        super().__init__(alpha=alpha)
        self.block_num, self.block_choices = _block_grid(block_num, block_choices)
        self.beta = v.number("beta", beta, lo=0)
        self.gamma = v.number("gamma", gamma, lo=0)
        self.eta = v.number("eta", eta, lo=0)
        self.neigh_size = v.integer("neigh_size", neigh_size, lo=1)
        self.n_labels = v.integer(
            "n_labels", n_labels, lo=2, hint=" (2: binary masks by an exact min-cut; 3: weights 0, 1/2, 1, the paper's)"
        )
        self.transport = v.flag("transport", transport)
        self.t_eps = v.number("t_eps", t_eps, lo=0)
        self.t_size = None if t_size is None else v.integer("t_size", t_size, lo=1, hint=" (None: the mask grid)")
        if saliency is not None and not callable(saliency):
            raise ValueError(
                f"saliency={saliency!r}: a callable (images, labels) -> N x H x W, e.g. GradientSaliency(model)"
            )
        self.saliency = saliency

    def __repr__(self) -> str:
        sal = "spectral_residual" if self.saliency is None else type(self.saliency).__name__
        return (
            f"PuzzleMix(alpha={self.alpha}, block_num={self.block_num!r}, "
            + ("" if self.block_choices is None else f"block_choices={self.block_choices}, ")
            + f"beta={self.beta}, gamma={self.gamma}, "
            f"eta={self.eta}, n_labels={self.n_labels}, transport={self.transport}, t_eps={self.t_eps}, t_size={self.t_size}, saliency={sal})"
        )

    def fill(self, p, rows, lam, *, rng, height, width, shared):
        super().fill(p, rows, lam, rng=rng, height=height, width=width, shared=shared)
        if self.block_choices is not None:  # one grid for the batch, from the plan's generator
            g = self.block_choices[int(rng.integers(len(self.block_choices)))]
            p.draws[self.name] = (min(g, height), min(g, width))

    def mask_grid(self, height: int, width: int, draws: dict | None = None) -> tuple[int, int]:
        """The mask grid ``(gh, gw)`` for ``height x width`` images: ``block_num`` or, with
        ``block_num="random"``, the batch's draw ``draws["puzzlemix"]`` (``MixParams.draws``; the
        smallest choice when the batch drew none: none of its samples is PuzzleMix's); capped by
        the image size."""
        if self.block_choices is None:
            gh, gw = self.block_num
        elif draws is None:
            raise ValueError(
                'PuzzleMix(block_num="random") draws its grid when the batch is planned: pass '
                "draws=params.draws (the loader's mask hook does)"
            )
        else:
            gh, gw = draws.get(self.name, (min(self.block_choices),) * 2)
        return min(gh, height), min(gw, width)

    def saliency_map(self, images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """N x H x W float32 saliency of the unmixed batch."""
        n, _, h, w = images.shape
        if self.saliency is None:
            return spectral_residual(images, norm=self._norm)
        sal = self.saliency(images, labels)
        if not isinstance(sal, torch.Tensor) or tuple(sal.shape) != (n, h, w):
            got = tuple(sal.shape) if isinstance(sal, torch.Tensor) else type(sal).__name__
            raise ValueError(f"PuzzleMix: saliency(images, labels) returned {got}; it must be N x H x W = {(n, h, w)}")
        return sal.detach().to(torch.float32)

    def _strips01(self, images: torch.Tensor, g: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``boundary_strips`` on the 0..1 scale: de-normalising is affine per channel, so it is
        applied to the strip means, not to the N x 3 x H x W batch."""
        strips = boundary_strips(images, g, self.neigh_size, dim)
        if self._norm is None:
            return strips
        std = torch.tensor(self._norm.std, dtype=torch.float64, device=images.device).view(1, 3, 1, 1)
        mean = torch.tensor(self._norm.mean, dtype=torch.float64, device=images.device).view(1, 3, 1, 1)
        before, after = strips
        return before * std + mean, after * std + mean

    @torch.no_grad()
    def plan(self, images: torch.Tensor, lam: torch.Tensor, partner: torch.Tensor, labels=None, *, draws=None):
        """Masks (N x 1 x gh x gw float32, 1 = own image; the grid: ``mask_grid``) and, with transport,
        the partner's and the own image's block permutations (N x tgh x tgw int64 each; None
        without), on the images' device. The graph cuts and assignments run on the host (float64),
        one per sample."""
        n, _, h, w = images.shape
        gh, gw = self.mask_grid(h, w, draws)
        partner = partner.to(images.device, torch.int64)
        partner_np = partner.cpu().numpy()  # the cuts run on the host: one copy per batch (a host sync on CUDA)
        sal = self.saliency_map(images, labels).clamp_min(0)
        pooled = block_means(sal, gh, gw)
        pooled = pooled / pooled.sum(dim=(1, 2), keepdim=True).clamp_min(1e-12)
        dv = strip_differences(self._strips01(images, gh, 2), partner, gw)
        dh = strip_differences(self._strips01(images, gw, 3), partner, gh).transpose(3, 4)
        beta = self.beta / (16.0 * math.sqrt(gh * gw))
        host = [t.cpu().numpy() for t in (pooled, dv, dh, lam.to(torch.float64))]
        pooled_np, dv_np, dh_np, lam_np = host
        masks = np.empty((n, gh, gw), dtype=np.float32)
        for i in range(n):
            pv, ph = pairwise_tables(dv_np[:, :, i], dh_np[:, :, i], beta, self.gamma)
            if self.n_labels == 2:
                u0, u1 = unary_costs(pooled_np[i], pooled_np[partner_np[i]], float(lam_np[i]), self.eta)
                masks[i] = minimise_energy(u0, u1, pv, ph)
            else:
                unary = label_unary_costs(
                    pooled_np[i], pooled_np[partner_np[i]], float(lam_np[i]), self.eta, self.n_labels
                )
                masks[i] = swap_minimise(unary, pv, ph) / (self.n_labels - 1)
        masks_t = torch.from_numpy(masks).to(images.device)
        full = None
        if not (nearest_is_blocks(h, gh) and nearest_is_blocks(w, gw)):
            # the kernel's nearest upsampling would not put the block edges where FLAG_GATHER does:
            # hand it the mask at full resolution (upsampling by 1 is exact)
            full = masks_t[:, block_index(h, gh, masks_t.device)][:, :, block_index(w, gw, masks_t.device)]
        out = (masks_t if full is None else full).unsqueeze(1)
        if not self.transport:
            return out, None, None
        tgh, tgw = (gh, gw)
        if self.t_size is not None:
            tgh, tgw = max(1, min(h // self.t_size, h)), max(1, min(w // self.t_size, w))
        if (tgh, tgw) == (gh, gw):
            t_sal, kept = pooled_np, masks.astype(np.float64)
        else:
            t_pool = block_means(sal, tgh, tgw)
            t_sal = (t_pool / t_pool.sum(dim=(1, 2), keepdim=True).clamp_min(1e-12)).cpu().numpy()
            if full is None:
                full = masks_t[:, block_index(h, gh, masks_t.device)][:, :, block_index(w, gw, masks_t.device)]
            kept = block_means(full, tgh, tgw).cpu().numpy()
        # each image's salient blocks moved to where it shows: the partner under 1 - mask, the own under the mask
        perms = np.stack([transport_plan(t_sal[partner_np[i]], 1.0 - kept[i], self.t_eps) for i in range(n)])
        own = np.stack([transport_plan(t_sal[i], kept[i], self.t_eps) for i in range(n)])
        to_device = lambda a: torch.from_numpy(a.reshape(n, tgh, tgw)).to(images.device)  # noqa: E731
        return out, to_device(perms), to_device(own)

    def mask_policy(self, images, lam, partner, labels=None, *, draws=None):
        masks, perm, perm_self = self.plan(images, lam, partner, labels, draws=draws)
        return masks if perm is None else (masks, perm, perm_self)


def _block_grid(block_num, block_choices) -> tuple:
    """``(block_num, block_choices)`` checked: ``((gh, gw), None)`` for a fixed grid, ``("random",
    choices)`` for a grid drawn per batch."""
    if isinstance(block_num, str):
        if block_num != "random":
            raise ValueError(f'block_num={block_num!r}: an int n (an n x n grid), (gh, gw) or "random"')
        choices = BLOCK_CHOICES if block_choices is None else block_choices
        if isinstance(choices, (str, bytes)) or not hasattr(choices, "__iter__") or not len(tuple(choices)):
            raise ValueError(
                f"block_choices={block_choices!r}: a non-empty sequence of positive ints, e.g. (2, 4, 8, 16)"
            )
        return "random", tuple(v.integer("block_choices", g, lo=1) for g in choices)
    if block_choices is not None:
        raise ValueError(
            f'block_choices={block_choices!r} is only used with block_num="random" (block_num={block_num!r} is fixed)'
        )
    grid = (block_num, block_num) if isinstance(block_num, (int, np.integer)) else tuple(block_num)
    if len(grid) != 2:
        raise ValueError(f'block_num={block_num!r}: an int n (an n x n grid), (gh, gw) or "random"')
    return tuple(v.integer("block_num", g, lo=1) for g in grid), None
