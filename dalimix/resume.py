"""Exact resume: ``ImageLoader.state_dict()`` / ``load_state_dict()``.

What a resumed loader must reproduce, and where each part comes from:

- the sample order: a function of (seed, epoch, rank) (``plan_epoch``), so the state only needs the
  epoch and the step;
- the crop windows, flips and mix parameters: functions of (seed, rank, epoch, step)
  (``dalimix.rng``; dalimix draws them and feeds them to DALI), nothing to save;
- an ``auto_augment`` preset's draws: DALI makes them from its own streams, which run on across
  the loader's one pipeline; the state then carries DALI's checkpoint (``pipe.checkpoint()`` after
  the last batch the training loop received), and the resumed loader builds its pipeline from it.
  Where the checkpoint cannot be used (another DALI version wrote it) the preset's draws restart,
  with a warning; everything else stays exact.

A state is per rank (each rank's streams differ). ``load_state_dict`` also takes the list of every
rank's states (``torch.distributed.all_gather_object``) and picks its own. This module uses the
loader's public surface only (``position``, ``seek``, ``dali_checkpoint`` and its settings).
"""

from __future__ import annotations

import dataclasses
import warnings

from .scan import loader_content
from .validate import check_state

STATE_FORMAT = 1
_KEY = "dalimix_loader_state"


def _dali_version() -> str:
    import nvidia.dali

    return nvidia.dali.__version__


def _spec_summary(spec) -> dict:
    """The augmentation spec as plain values (what must match for DALI's checkpoint to mean the same)."""
    out = {}
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if isinstance(value, (bool, int, float, str, type(None))) or (
            isinstance(value, tuple) and all(isinstance(v, (bool, int, float, str)) for v in value)
        ):
            out[f.name] = value
        else:
            out[f.name] = type(value).__qualname__
    return out


def loader_state(loader) -> dict:
    """``ImageLoader.state_dict()``: plain values only (``torch.save`` / ``torch.load(weights_only=True)`` safe)."""
    epoch, step = loader.position()
    checkpoint = loader.dali_checkpoint()
    return {
        _KEY: STATE_FORMAT,
        "epoch": int(epoch),
        "step": int(step),
        "dali_checkpoint": checkpoint,
        "dali_version": _dali_version(),
        "mixup_enabled": None if loader.mix is None else bool(loader.mixup_enabled),
        "dataset": {
            "fingerprint": loader.samples.fingerprint,
            "num_samples": len(loader.samples),
            "source": loader.samples.source,
            "content": loader_content(loader),
        },
        "batch_size": loader.batch_size,
        "seed": loader.seed,
        "shuffle": loader.shuffle,
        "shard_id": loader.shard_id,
        "num_shards": loader.num_shards,
        "last_batch_policy": loader.last_batch_policy.name,
        "augment": _spec_summary(loader.spec),
    }


def _pick_rank(loader, state):
    if isinstance(state, (list, tuple)):
        mine = [s for s in state if isinstance(s, dict) and s.get("shard_id") == loader.shard_id]
        if len(mine) != 1:
            raise ValueError(
                f"load_state_dict: the list of states holds {len(mine)} state(s) for shard_id="
                f"{loader.shard_id}; pass this rank's state_dict() or the list of every rank's"
            )
        return mine[0]
    return state


def _check(loader, state: dict) -> None:
    check_state(loader, state, format_key=_KEY, format_version=STATE_FORMAT)  # keys, types, content digest
    data = state["dataset"]
    if data["fingerprint"] != loader.samples.fingerprint or data["num_samples"] != len(loader.samples):
        raise ValueError(
            f"load_state_dict: the state is from another data set ({data['source']}, {data['num_samples']} samples, "
            f"fingerprint {data['fingerprint']}) than this loader's ({loader.samples.source}, {len(loader.samples)} "
            f"samples, fingerprint {loader.samples.fingerprint}); resume with the same files and labels, or start afresh"
        )
    mine = loader_state_settings(loader)
    for name, value in mine.items():
        if state[name] != value:
            raise ValueError(
                f"load_state_dict: the state was saved with {name}={state[name]!r} but this loader has "
                f"{name}={value!r}; an exact resume needs the same {name} (or start afresh without load_state_dict)"
            )


def loader_state_settings(loader) -> dict:
    """The settings a state must share with the loader it is loaded into."""
    return {
        "batch_size": loader.batch_size,
        "seed": loader.seed,
        "shuffle": loader.shuffle,
        "num_shards": loader.num_shards,
        "shard_id": loader.shard_id,
        "last_batch_policy": loader.last_batch_policy.name,
        "augment": _spec_summary(loader.spec),
    }


def restore_loader_state(loader, state) -> None:
    """``ImageLoader.load_state_dict(state)``: validate, then make the next iteration start at (epoch, step)."""
    state = _pick_rank(loader, state)
    _check(loader, state)
    epoch, step = int(state["epoch"]), int(state["step"])
    num_batches = len(loader)
    if not (0 <= step < max(num_batches, 1)):
        raise ValueError(f"load_state_dict: step {step} is outside epoch {epoch}'s {num_batches} batches")
    checkpoint = state["dali_checkpoint"]
    if checkpoint is not None and state["dali_version"] != _dali_version():
        warnings.warn(
            f"dalimix: the loader state holds a DALI {state['dali_version']} checkpoint but DALI {_dali_version()} "
            f"is installed; the auto_augment preset's random draws restart (order, crops, flips and mixing "
            f"resume exactly)",
            stacklevel=3,
        )
        checkpoint = None
    loader.seek(epoch, step, dali_checkpoint=checkpoint)
    if loader.mix is not None and state["mixup_enabled"] is not None:
        loader.mixup_enabled = state["mixup_enabled"]
