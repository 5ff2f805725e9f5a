"""dalimix.policy: the vector over sub-policies, its validation and timing, what the loader applies and reports."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dalimix import ImageLoader
from dalimix.mix import Mixer, MixUp
from dalimix.policy import OPERATIONS, Policy, PolicyBatch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _stats():
    """scipy.stats, imported by the tests that use it (a run of the GPU tests alone needs no scipy)."""
    return pytest.importorskip("scipy.stats")


# cheap operations whose effect is recognisable exactly
FOUR = [[("identity", 1.0, None)], [("hflip", 1.0, None)], [("vflip", 1.0, None)], [("invert", 1.0, None)]]


def black_fill():
    """A DALI augmentation that paints the whole image black: unmistakable in the output."""
    from nvidia.dali import types
    from nvidia.dali.auto_aug.core import augmentation

    @augmentation
    def fill_black(data, _):
        return data * types.Constant(0, dtype=types.UINT8)

    return fill_black


def loader_for(root, policy=None, **kw):
    args = dict(root=root, batch_size=5, size=16, device="cpu", hflip=0.0, seed=3, num_threads=1)
    args.update(kw)
    return ImageLoader(auto_augment=policy, **args)


def batches(loader, count, on_batch=None):
    """``count`` batches over as many epochs as it takes: [(images, labels or targets, PolicyBatch or None)];
    ``on_batch(t)`` runs after batch ``t`` is returned; ``loader.infos`` collects each ``last_batch``."""
    out = []
    loader.infos = []
    while len(out) < count:
        for images, labels in loader:
            loader.infos.append(loader.last_batch)
            out.append((images, labels, loader.last_batch.extra.get("policy")))
            if on_batch is not None:
                on_batch(len(out) - 1)
            if len(out) == count:
                break
    return out


# ------------------------------------------------------------------------------ the vector (host)
def test_sampled_histogram_follows_the_vector():
    stats = _stats()
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    policy = Policy(sub_policies=[[("identity", 1.0, None)]] * 5, probs=p)
    counts = sum(policy.sample(1000, np.random.default_rng([7, i])).counts() for i in range(20))
    assert stats.chisquare(counts, 20000 * p).pvalue > 1e-3
    # the same test rejects a vector the draws do not follow
    assert stats.chisquare(counts, 20000 * np.full(5, 0.2)).pvalue < 1e-6


def test_zero_probability_is_never_drawn_and_step_coins_follow_their_probability():
    stats = _stats()
    policy = Policy(
        sub_policies=[[("rotate", 0.3, 4), ("equalize", 0.8, None)], [("hflip", 1.0, None)], [("invert", 0.0, None)]],
        probs=[0.0, 1.0, 0.0],
    )
    assert (policy.sample(50000, np.random.default_rng(1)).sub_policy == 1).all()
    policy.set_probs([1.0, 0.0, 0.0])
    draws = policy.sample(20000, np.random.default_rng(2))
    assert (draws.sub_policy == 0).all()
    for step, prob in enumerate((0.3, 0.8)):
        assert stats.binomtest(int(draws.applied[:, step].sum()), 20000, prob).pvalue > 1e-3
    assert stats.binomtest(int(draws.negated[:, 0].sum()), 20000, 0.5).pvalue > 1e-3
    # skipped steps run the identity; sub-policies shorter than the longest never run their missing steps
    policy.set_probs([0.0, 0.0, 1.0])
    draws = policy.sample(1000, np.random.default_rng(3))
    assert not draws.applied.any()


def test_edges_of_the_vector():
    policy = Policy(sub_policies=FOUR, probs=[0.0, 0.0, 0.0, 1.0])
    assert (policy.sample(10000, np.random.default_rng(0)).sub_policy == 3).all()
    policy.set_probs([1.0, 0.0, 0.0, 0.0])
    assert (policy.sample(10000, np.random.default_rng(0)).sub_policy == 0).all()


@pytest.mark.parametrize(
    "bad, message",
    [
        ([0.5, 0.5, 0.5], "has shape \\(3,\\): the policy has 4 sub-policies"),
        ([[0.25] * 4], "has shape \\(1, 4\\)"),
        ([0.5, 0.5, 0.5, -0.5], "negative entries at \\[3\\]"),
        ([0.25, float("nan"), 0.5, 0.25], "NaN or infinite entries at \\[1\\]"),
        ([0.25, float("inf"), 0.5, 0.25], "NaN or infinite entries at \\[1\\]"),
        ([0.3, 0.3, 0.3, 0.3], "sums to 1.2"),
        ([0.0, 0.0, 0.0, 0.0], "sums to 0.0"),
        ("uniform", "4 numbers"),
    ],
)
def test_bad_vectors_are_refused_and_the_previous_vector_stays(bad, message):
    policy = Policy(sub_policies=FOUR, probs=[0.1, 0.2, 0.3, 0.4])
    before = policy.probs
    with pytest.raises(ValueError, match=message) as err:
        policy.set_probs(bad)
    assert "keeps its previous vector" in str(err.value)
    assert torch.equal(policy.probs, before) and policy.version == 0


def test_accepted_vectors():
    policy = Policy(sub_policies=FOUR)
    assert torch.equal(policy.probs, torch.full((4,), 0.25, dtype=torch.float64))
    logits = torch.tensor([0.3, -1.0, 2.0, 0.1], requires_grad=True)
    policy.set_probs(torch.softmax(logits, 0))  # float32, needs no detach by the caller
    torch.testing.assert_close(policy.probs, torch.softmax(logits.detach().double(), 0), atol=1e-7, rtol=0)
    policy.set_probs(np.array([0.25, 0.25, 0.25, 0.25 + 5e-5]))  # within tolerance: renormalised exactly
    assert abs(float(policy.probs.sum()) - 1) < 1e-12 and policy.version == 2
    copy = policy.probs
    copy[0] = 7.0  # reading gives a copy: the shared vector is not touched
    assert policy.probs[0] < 1


@pytest.mark.parametrize(
    "subs, message",
    [
        ([], "sub_policies is empty"),
        ([[]], "sub_policies\\[0\\] is empty"),
        ([[("blur", 1.0, None)]], "unknown operation 'blur'"),
        ([[("rotate", 1.5, 3)]], "probability must be a number in \\[0, 1\\]"),
        ([[("rotate", 0.5, None)]], "needs a magnitude bin"),
        ([[("rotate", 0.5, 11)]], "needs a magnitude bin, an int in \\[0, 11\\)"),
        ([[("equalize", 0.5, 3)]], "takes no magnitude"),
        ([[("rotate", 0.5)]], "each step is \\(operation, probability, magnitude\\)"),
        ([[(print, 0.5, None)]], "must be a name"),
    ],
)
def test_sub_policies_are_validated(subs, message):
    with pytest.raises(ValueError, match=message):
        Policy(sub_policies=subs)


def test_other_arguments_are_validated(small_dataset):
    with pytest.raises(ValueError, match="num_magnitude_bins"):
        Policy(sub_policies=FOUR, num_magnitude_bins=0)
    with pytest.raises(ValueError, match="fill_value"):
        Policy(sub_policies=FOUR, fill_value=300)
    with pytest.raises(ValueError, match="keeps its previous vector"):
        Policy(sub_policies=FOUR, probs=[1.0, 0.0])
    with pytest.raises(ValueError, match="use it with train=True"):
        ImageLoader(root=small_dataset, batch_size=4, device="cpu", train=False, auto_augment=Policy(sub_policies=FOUR))
    with pytest.raises(ValueError, match="nvidia.dali.auto_aug.core.Policy"):
        Policy.from_dali("image_net")


def test_describe():
    policy = Policy(sub_policies=[[("rotate", 0.6, 8), ("equalize", 1.0, None)]])
    assert policy.describe(0) == "rotate(p=0.6, m=8) > equalize(p=1)"
    assert "rotate" in OPERATIONS and len(policy) == 1


# ------------------------------------------------------------------------------ in the loader (DALI CPU)
@pytest.mark.parametrize("device", DEVICES)
def test_reported_sub_policies_are_the_ones_applied(small_dataset, device):
    """Identity, flips, invert, a black fill at probability 0, and a coin-flipped flip: every output
    image equals the unaugmented image transformed as ``last_batch.extra["policy"]`` says."""
    subs = [*FOUR, [(black_fill(), 1.0, None)], [("hflip", 0.5, None), ("vflip", 0.5, None)]]
    probs = [0.2, 0.15, 0.15, 0.15, 0.0, 0.35]
    kw = dict(dtype=torch.float32, mean=(0, 0, 0), std=(1 / 255,) * 3, device=device)
    base = batches(loader_for(small_dataset, **kw), 8)
    got = batches(loader_for(small_dataset, Policy(sub_policies=subs, probs=probs), **kw), 8)
    seen = set()
    for (x0, y0, _), (x, y, draws) in zip(base, got):
        assert isinstance(draws, PolicyBatch) and len(draws) == x.shape[0] and draws.version == 0
        assert torch.equal(y, y0)
        for i, k in enumerate(draws.sub_policy.tolist()):
            seen.add(k)
            want = x0[i]  # C x H x W, values 0..255
            if k == 1:
                want = want.flip(2)
            elif k == 2:
                want = want.flip(1)
            elif k == 3:
                want = 255 - want
            elif k == 5:
                if draws.applied[i, 0]:
                    want = want.flip(2)
                if draws.applied[i, 1]:
                    want = want.flip(1)
            assert torch.equal(x[i], want), (k, draws.applied[i])
            assert x[i].amax() > 0  # never the black fill
    assert 4 not in seen and seen == {0, 1, 2, 3, 5}


@pytest.mark.parametrize("device", DEVICES)
def test_a_new_vector_applies_from_the_next_batch(small_dataset, device):
    """A vector set after batch t is returned is the one batch t+1 uses, however far DALI prefetches."""
    policy = Policy(sub_policies=FOUR, probs=[1.0, 0.0, 0.0, 0.0])
    schedule = {2: [0.0, 1.0, 0.0, 0.0], 5: [0.0, 0.0, 0.5, 0.5], 6: [0.0, 0.0, 0.0, 1.0]}
    in_force = [[1.0, 0.0, 0.0, 0.0]]

    def change(t):
        if t in schedule:
            policy.set_probs(schedule[t])
        in_force.append(schedule.get(t, in_force[-1]))

    got = batches(loader_for(small_dataset, policy, prefetch=3, device=device), 9, on_batch=change)
    want = [0, 0, 0, 1, 1, 1, None, 3, 3]
    versions = [0, 0, 0, 1, 1, 1, 2, 3, 3]
    for t, (_, _, draws) in enumerate(got):
        assert draws.version == versions[t]
        np.testing.assert_array_equal(draws.probs, in_force[t])
        if want[t] is None:
            assert set(draws.sub_policy.tolist()) <= {2, 3}
        else:
            assert (draws.sub_policy == want[t]).all(), (t, draws.sub_policy)


def test_histogram_in_the_loader_follows_each_vector(small_dataset):
    """Chi-square on the sub-policies the loader reports, before and after a vector change."""
    stats = _stats()
    p1, p2 = np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.6, 0.0, 0.1, 0.3])
    policy = Policy(sub_policies=FOUR, probs=p1)
    loader = loader_for(small_dataset, policy, batch_size=10, size=8)
    got = batches(loader, 40, on_batch=lambda t: t == 19 and policy.set_probs(p2))
    first = sum(d.counts() for _, _, d in got[:20])
    second = sum(d.counts() for _, _, d in got[20:])
    assert stats.chisquare(first, first.sum() * p1).pvalue > 1e-3
    assert second[1] == 0
    keep = p2 > 0
    assert stats.chisquare(second[keep], second.sum() * p2[keep]).pvalue > 1e-3
    assert stats.chisquare(second, second.sum() * p1).pvalue < 1e-6


def test_a_refused_vector_leaves_the_loader_on_the_previous_one(small_dataset):
    policy = Policy(sub_policies=FOUR, probs=[0.0, 1.0, 0.0, 0.0])
    loader = loader_for(small_dataset, policy)
    it = iter(loader)
    next(it)
    for bad in ([0.5, 0.5], [float("nan"), 1, 0, 0], [2.0, -1.0, 0, 0], [0.2, 0.2, 0.2, 0.2]):
        with pytest.raises(ValueError):
            policy.set_probs(bad)
    next(it)
    draws = loader.last_batch.extra["policy"]
    assert (draws.sub_policy == 1).all() and draws.version == 0


def test_draws_are_reproducible_and_the_partial_batch_reports_its_real_samples(small_dataset):
    def run():
        policy = Policy(sub_policies=FOUR)
        out = batches(
            loader_for(small_dataset, policy, batch_size=6),
            4,
            on_batch=lambda t: t == 1 and policy.set_probs([0.7, 0.1, 0.1, 0.1]),
        )
        return out

    a, b = run(), run()
    for (xa, _, da), (xb, _, db) in zip(a, b):
        assert torch.equal(xa, xb) and np.array_equal(da.sub_policy, db.sub_policy)
    assert [len(d) for _, _, d in a] == [6, 6, 6, 2]  # 20 samples, PARTIAL


def test_dali_policy_runs_in_the_loader(small_dataset):
    """DALI's AutoAugment ImageNet policy (translations need the image shape) as a dalimix Policy."""
    from nvidia.dali.auto_aug.auto_augment import get_image_net_policy

    policy = Policy.from_dali(get_image_net_policy(use_shape=True, max_translate_rel=0.45))
    assert len(policy) == 25 and policy.num_magnitude_bins == 11
    got = batches(loader_for(small_dataset, policy, batch_size=10, size=24), 2)
    base = batches(loader_for(small_dataset, batch_size=10, size=24), 2)
    for (x, _, draws), (x0, _, _) in zip(got, base):
        assert torch.isfinite(x).all() and x.shape == (10, 3, 24, 24)
        untouched = ~draws.applied.any(axis=1)
        changed = (x != x0).flatten(1).any(1).numpy()
        assert not changed[untouched].any()  # no step ran: the image is the crop, unchanged
        assert changed[~untouched].mean() > 0.5  # most samples with a step are visibly changed


@pytest.mark.parametrize("device", DEVICES)
def test_policy_runs_before_the_mix_kernel(small_dataset, device):
    """With MixUp, each output is lam * own + (1 - lam) * partner of the policy's outputs."""
    kw = dict(dtype=torch.float32, batch_size=6, size=16, device=device)
    subs = [[("identity", 1.0, None)], [("invert", 1.0, None)], [("hflip", 1.0, None)]]
    plain = batches(loader_for(small_dataset, Policy(sub_policies=subs), **kw), 3)
    loader = loader_for(
        small_dataset, Policy(sub_policies=subs), mix=Mixer(methods=[MixUp(alpha=1.0)], mode="elem"), **kw
    )
    mixed = batches(loader, 3)
    for (x, _, d0), (xm, targets, dm), info in zip(plain, mixed, loader.infos):
        np.testing.assert_array_equal(d0.sub_policy, dm.sub_policy)  # the mixing stream is separate
        p = info.params
        lam = torch.from_numpy(p.lam.astype(np.float32)).to(x.device)[:, None, None, None]
        want = lam * x + (1 - lam) * x[torch.from_numpy(p.partner).to(x.device)]
        torch.testing.assert_close(xm, want, atol=1e-4, rtol=1e-5)
        assert targets.shape == (x.shape[0], 4)
    assert any((d.sub_policy == 1).any() for _, _, d in plain)  # inverted images took part


def test_policy_resumes_exactly_with_its_vector(small_dataset):
    """The draws are a function of (seed, rank, epoch, step) and the vector: a resumed loader whose
    policy gets the saved vector back yields the uninterrupted run's batches and draws."""
    vec = [0.1, 0.2, 0.3, 0.4]

    def make():
        policy = Policy(sub_policies=FOUR)
        return ImageLoader(
            root=small_dataset, batch_size=6, size=16, device="cpu", seed=8, num_threads=1, auto_augment=policy
        ), policy

    full, policy = make()
    policy.set_probs(vec)
    want = batches(full, 4)
    first, policy = make()
    policy.set_probs(vec)
    it = iter(first)
    next(it)
    state, saved = first.state_dict(), policy.probs
    resumed, policy = make()
    resumed.load_state_dict(state)
    policy.set_probs(saved)
    got = [(x, resumed.last_batch.extra["policy"]) for x, _ in resumed]
    assert len(got) == 3
    for (x, d), (xw, _, dw) in zip(got, want[1:]):
        assert torch.equal(x, xw) and np.array_equal(d.sub_policy, dw.sub_policy)
        assert np.array_equal(d.applied, dw.applied)


# ------------------------------------------------------------------------- the stage on CUDA
class _FakeEvent:
    def __init__(self):
        self.stream, self.done, self.waited = None, False, False

    def record(self, stream):
        self.stream = stream

    def query(self):
        return self.done

    def synchronize(self):
        self.waited = self.done = True


class _FakeStream(str):
    synced = False

    def synchronize(self):
        self.synced = True


class _FakePipe:
    def __init__(self):
        self.fed, self.shared, self.released = {}, [], 0

    def feed_input(self, name, data, layout=None, cuda_stream=None):
        self.fed[name] = cuda_stream

    def schedule_run(self):
        pass

    def share_outputs(self, cuda_stream=None):
        self.shared.append(cuda_stream)
        return (type("Out", (), {"as_tensor": lambda self: self})(),)

    def release_outputs(self):
        self.released += 1


def test_cuda_stage_uses_the_images_device_stream_and_keeps_outputs_until_their_consumers_ran(monkeypatch):
    """On CUDA the stage feeds DALI on, and binds its output to, the current stream of the images'
    device (cuda:1 here while the current device is cuda:0), and hands a batch's output back only
    once an event recorded after its consumers has completed, never waiting unless more than HELD
    outputs are pending. DALI and the GPU are stood in for: this runs without either."""
    from dalimix.policy import PolicyStage

    streams = {}

    def current_stream(device=None):
        index = "current" if device is None else torch.device(device).index
        return streams.setdefault(index, _FakeStream(f"stream of {index}"))

    events = []

    def event():
        events.append(_FakeEvent())
        return events[-1]

    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "Event", event)
    monkeypatch.setattr(torch, "from_dlpack", lambda out: out)
    stage = PolicyStage.__new__(PolicyStage)
    stage.policy = Policy(sub_policies=[[("hflip", 1.0, None)]])
    stage._pipe, stage._feeds_magnitude, stage._feeds_sign = _FakePipe(), False, False
    stage._holding, stage._last, stage._held = False, None, []
    images = type("Images", (), {"is_cuda": True, "device": torch.device("cuda", 1), "shape": (4, 8, 8, 3)})()
    rng = np.random.default_rng(0)

    out1, _ = stage.apply(images, rng)
    assert stage._pipe.fed["images"] == "stream of 1" and stage._pipe.shared == ["stream of 1"]
    assert "current" not in streams  # the current device's stream was never asked for
    out2, _ = stage.apply(images, rng)
    assert len(events) == 1 and events[0].stream == "stream of 1"
    assert [o for o, _ in stage._held] == [out1]  # kept: its consumers have not run yet
    events[0].done = True
    stage.apply(images, rng)
    assert [o for o, _ in stage._held] == [out2]  # out1 handed back, out2 still pending
    for _ in range(PolicyStage.HELD):  # HELD + 1 pending after the last: the oldest (out2) is waited for
        stage.apply(images, rng)
    assert len(stage._held) == PolicyStage.HELD and events[1].waited  # the oldest was waited for
    assert not any(e.waited for e in events[2:])
    stage.close()
    assert stage._held == [] and all(e.done for e in events) and streams[1].synced
