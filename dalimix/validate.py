"""Argument checks shared by every public constructor: each raises ValueError naming the argument,
the value given and what is expected, so no bad value slips through as a TypeError deep inside."""

from __future__ import annotations

import math
import numbers

import numpy as np


def _describe(lo, hi, lo_open, hi_open) -> str:
    if lo is None and hi is None:
        return "a number"
    if hi is None:
        return f"a number {'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f"a number {'<' if hi_open else '<='} {hi}"
    return f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def number(
    name: str, value, *, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False, hint: str = ""
) -> float:
    """A finite real number (bools refused) within the bounds."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(float(value))
    if ok:
        v = float(value)
        ok = (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi))
    if not ok:
        raise ValueError(f"{name}={value!r}: {_describe(lo, hi, lo_open, hi_open)}{hint}")
    return float(value)


def integer(name: str, value, *, lo=None, hi=None, hint: str = "") -> int:
    """An int (numpy ints accepted, bools and floats refused) within [lo, hi]."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if ok:
        ok = (lo is None or value >= lo) and (hi is None or value <= hi)
    if not ok:
        rng = f" in [{lo}, {hi}]" if lo is not None and hi is not None else (f" >= {lo}" if lo is not None else "")
        raise ValueError(f"{name}={value!r}: an int{rng}{hint}")
    return int(value)


def pair(
    name: str, value, *, lo=None, hi=None, lo_open: bool = False, ordered: bool = True, hint: str = ""
) -> tuple[float, float]:
    """Two finite numbers within the bounds, ``min <= max`` when ``ordered``."""
    try:
        a, b = value
        a = number(name, a, lo=lo, hi=hi, lo_open=lo_open)
        b = number(name, b, lo=lo, hi=hi, lo_open=lo_open)
    except (TypeError, ValueError):
        a = b = None
    if a is None or (ordered and a > b):
        bounds = _describe(lo, hi, lo_open, False).replace("a number", "numbers")
        raise ValueError(f"{name}={value!r}: a pair (min, max) of {bounds}{', min <= max' if ordered else ''}{hint}")
    return a, b


def size(name: str, value, *, lo: int = 1, hint: str = "") -> tuple[int, int]:
    """An int ``s`` (-> ``(s, s)``) or a ``(height, width)`` pair of ints, each >= ``lo``."""
    pair: tuple | list = ()
    if isinstance(value, (tuple, list)) and len(value) == 2:
        pair = value
    elif isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        pair = (value, value)
    try:
        h, w = (integer(name, s, lo=lo) for s in pair)
        return h, w
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: an int or (height, width) of ints >= {lo}{hint}") from None


def flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}={value!r}: True or False")
    return bool(value)


def choice(name: str, value, options) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name}={value!r}: one of {', '.join(map(repr, options))}")
    return value


# ------------------------------------------------------------------- loader arguments
MAX_PREFETCH = 32  # batches DALI prepares ahead; more only costs memory and a long shutdown
MAX_SIDE = 4096  # output height/width: larger training crops are not what this loader is built for


def data_source(*, root=None, file_list=None, webdataset=None, samples=None, classes=None) -> None:
    """The data arguments of ``ImageLoader``: paths are str/PathLike, ``classes=`` names file-list
    or shard labels (an ImageFolder tree names its classes by its folders)."""
    import os

    for name, value in (("root", root), ("file_list", file_list)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise ValueError(
                f"{name}={value!r}: a path (str or pathlib.Path)"
                + (
                    " of an ImageFolder tree root/<class>/<image>"
                    if name == "root"
                    else " of a text file of 'path label' lines"
                )
            )
    if webdataset is not None and not isinstance(webdataset, (str, os.PathLike, list, tuple)):
        raise ValueError(f"webdataset={webdataset!r}: a folder or glob of .tar shards, or a list of shard paths")
    if classes is not None:
        if file_list is None and webdataset is None:
            where = (
                "samples= carries its own classes"
                if samples is not None
                else "an ImageFolder tree takes its class names from its sub-folders"
            )
            raise ValueError(f"classes= names the labels of a file_list= or webdataset= source; {where}: drop classes=")
        if isinstance(classes, (str, bytes)) or not all(isinstance(c, str) for c in _iterable(classes, "classes")):
            raise ValueError(f"classes={classes!r}: a list of class names (str), label i named by classes[i]")


def _iterable(value, name: str):
    try:
        return list(value)
    except TypeError:
        raise ValueError(f"{name}={value!r}: a list") from None


def normalization(mean, std) -> None:
    """``mean``/``std`` on the 0..1 scale: each mean in [0, 1] and each std in (0, 1]; a value above
    1 is the 0..255 scale (``mean=(123.7, 116.3, 103.5)``), which would silently give wrong inputs."""
    for name, value, lo_open in (("mean", mean, False), ("std", std, True)):
        try:
            values = [float(x) for x in value]
        except (TypeError, ValueError):
            raise ValueError(f"{name}={value!r}: three numbers (R, G, B) on the 0..1 scale") from None
        if len(values) != 3 or not all(math.isfinite(x) for x in values):
            raise ValueError(f"{name}={value!r}: three finite numbers (R, G, B) on the 0..1 scale")
        if max(values) > 5 and min(values) >= 0:
            scaled = tuple(round(x / 255, 4) for x in values)
            raise ValueError(
                f"{name}={tuple(value)!r} looks like the 0..255 scale; dalimix takes mean/std on the "
                f"0..1 scale (torchvision's and timm's convention): {name}={scaled}"
            )
        if any(x > 1 or (x <= 0 if lo_open else x < 0) for x in values):
            bound = "(0, 1]" if lo_open else "[0, 1]"
            raise ValueError(f"{name}={tuple(value)!r}: each value in {bound} (the 0..1 scale)")


def mixer(mix):
    """``ImageLoader(mix=...)``: None or a dalimix mixer (``plan`` + ``targets``, e.g. ``Mixup``, ``Mixer``)."""
    if mix is None:
        return None
    if callable(getattr(mix, "plan", None)) and callable(getattr(mix, "targets", None)):
        return mix
    from .mix.methods import MixMethod

    if isinstance(mix, MixMethod):
        hint = f"wrap the method in a mixer: mix=Mixer(methods=[{type(mix).__name__}(...)])"
    elif isinstance(mix, str):
        hint = "strings are not parsed here: mix=Mixup(mixup_alpha=0.8, cutmix_alpha=1.0) (dalimix.mix), or Mixer(methods=[...])"
    else:
        hint = "pass a dalimix.mix mixer, e.g. mix=Mixup(mixup_alpha=0.8, cutmix_alpha=1.0) or Mixer(methods=[MixUp()])"
    raise ValueError(f"mix={mix!r} is not a dalimix mixer; {hint}")


def methods(value) -> list:
    """``Mixer(methods=...)``: a non-empty list of ``dalimix.mix`` methods."""
    from .mix.methods import MixMethod

    if isinstance(value, MixMethod):
        raise ValueError(f"methods={value!r}: a list of methods, e.g. methods=[{type(value).__name__}(...)]")
    try:
        out = list(value)
    except TypeError:
        out = []
    if not out or not all(isinstance(m, MixMethod) for m in out):
        raise ValueError(f"methods={value!r}: a non-empty list of dalimix.mix methods (MixUp(), CutMix(), ...)")
    return out


def prefetch(value) -> int:
    """Batches DALI prepares ahead: 1..MAX_PREFETCH (each one holds a decoded batch in memory)."""
    return integer(
        "prefetch",
        value,
        lo=1,
        hi=MAX_PREFETCH,
        hint=" (2 is DALI's default; each batch ahead holds a decoded batch in memory)",
    )


def _available_bytes(device) -> tuple[int, str] | None:
    """(bytes available, where) on ``device``: free GPU memory, or the host's MemAvailable."""
    try:
        if getattr(device, "type", "cpu") == "cuda":
            import torch

            free, _ = torch.cuda.mem_get_info(device)
            return int(free), f"free on {device}"
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available host memory"
    except Exception:
        return None
    return None


def loader_memory(
    *, batch_size: int, height: int, width: int, prefetch: int, itemsize: int, device, keep_unmixed: bool = False
) -> int:
    """Refuse an output size whose buffers cannot fit: each side <= MAX_SIDE, and the loader's
    estimated working set (DALI's uint8 batches in flight, resize scratch, the output batches)
    within the memory available. Returns the estimate in bytes."""
    for name, side in (("height", height), ("width", width)):
        if side > MAX_SIDE:
            raise ValueError(
                f"size: {name} {side} is above dalimix's bound of {MAX_SIDE} pixels per side; "
                "train at a smaller size (e.g. 224 or 384)"
            )
    pixels = batch_size * height * width * 3
    outputs = 2 + int(bool(keep_unmixed))  # the batch in use, the one being written (+ the unmixed copy)
    estimate = pixels * (prefetch + 2) + pixels * itemsize * outputs
    avail = _available_bytes(device)
    if avail is not None and estimate > avail[0]:
        gib = 2**30
        raise ValueError(
            f"size={height}x{width} with batch_size={batch_size} and prefetch={prefetch} needs about "
            f"{estimate / gib:.1f} GiB for the loader's buffers, more than the {avail[0] / gib:.1f} GiB {avail[1]}; "
            "use a smaller size, batch_size or prefetch"
        )
    return estimate


# ----------------------------------------------------------------------- loader states
def _state_error(key: str, value, expected: str):
    from .errors import StateError

    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return StateError(
        f"load_state_dict: state[{key!r}]={shown}: {expected}; pass what ImageLoader.state_dict() "
        "returned (unchanged), or start afresh without load_state_dict"
    )


def _protobuf_ok(data: bytes) -> bool:
    """True if ``data`` parses as a protobuf message: every field's key, wire type and length fit
    (DALI's checkpoints are protobuf ``Checkpoint`` messages; garbage or a cut copy does not)."""

    def parse(buf: bytes) -> bool:
        i, n = 0, len(buf)
        while i < n:
            key, i = _varint(buf, i)
            if key is None or key >> 3 == 0:
                return False
            wire = key & 7
            if wire == 0:
                _, i = _varint(buf, i)
                if i is None:
                    return False
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            elif wire == 2:
                length, i = _varint(buf, i)
                if length is None or i + length > n:
                    return False
                i += length
            else:
                return False
            if i is None or i > n:
                return False
        return True

    return isinstance(data, (bytes, bytearray)) and parse(bytes(data))


def _varint(buf: bytes, i: int):
    shift = value = 0
    while i < len(buf) and shift < 64:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7
    return None, None


def loader_state(state: dict, *, expected_keys: dict) -> None:
    """Check a loader state's every key and type before anything uses it (``ImageLoader.load_state_dict``).

    ``expected_keys`` maps each key to a check: "int>=0", "int>=1", "bool", "bool|None", "str",
    "dict", "checkpoint". Raises ``dalimix.errors.StateError`` (a ValueError) naming the key.
    """
    from .errors import StateError

    if not isinstance(state, dict):
        raise StateError(
            f"load_state_dict: a loader state is a dict (what ImageLoader.state_dict() returns), "
            f"got {type(state).__name__}"
        )
    for key, kind in expected_keys.items():
        if key not in state:
            raise StateError(
                f"load_state_dict: the state has no {key!r} entry; pass what ImageLoader.state_dict() "
                "returned (unchanged), or start afresh without load_state_dict"
            )
        value = state[key]
        is_int = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
        if kind == "int>=0" and not (is_int and value >= 0):
            raise _state_error(key, value, "a non-negative int")
        if kind == "int>=1" and not (is_int and value >= 1):
            raise _state_error(key, value, "a positive int")
        if kind == "bool" and not isinstance(value, (bool, np.bool_)):
            raise _state_error(key, value, "True or False")
        if kind == "bool|None" and not (value is None or isinstance(value, (bool, np.bool_))):
            raise _state_error(key, value, "True, False or None")
        if kind == "str" and not isinstance(value, str):
            raise _state_error(key, value, "a str")
        if kind == "dict" and not isinstance(value, dict):
            raise _state_error(key, value, "a dict")
        if kind == "checkpoint" and value is not None and not _protobuf_ok(value):
            raise _state_error(
                key,
                value,
                "None or the bytes of DALI's pipeline checkpoint (this is not one: cut, changed or made by hand)",
            )


STATE_KEYS = {
    "epoch": "int>=0",
    "step": "int>=0",
    "dali_checkpoint": "checkpoint",
    "dali_version": "str",
    "mixup_enabled": "bool|None",
    "dataset": "dict",
    "batch_size": "int>=1",
    "seed": "int>=0",
    "shuffle": "bool",
    "shard_id": "int>=0",
    "num_shards": "int>=1",
    "last_batch_policy": "str",
    "augment": "dict",
}
DATASET_KEYS = {"fingerprint": "str", "num_samples": "int>=0", "source": "str"}


def check_state(loader, state, *, format_key: str, format_version: int) -> None:
    """Everything ``load_state_dict`` must know before it trusts ``state``: the format, every key
    and type (``loader_state``), and, where the file names match, that the files are the same ones
    (``dalimix.scan.content_digest``: sizes per class). Raises ``StateError`` (a ValueError)."""
    from .errors import StateError
    from .scan import loader_content

    if not isinstance(state, dict) or format_key not in state:
        raise StateError("load_state_dict: not a dalimix loader state; pass what ImageLoader.state_dict() returned")
    if state[format_key] != format_version:
        raise StateError(
            f"load_state_dict: state format {state[format_key]!r} is not this dalimix's ({format_version})"
        )
    loader_state(state, expected_keys=STATE_KEYS)
    data = state["dataset"]
    for key, kind in DATASET_KEYS.items():
        if key not in data:
            raise StateError(
                f"load_state_dict: state['dataset'] has no {key!r} entry; pass what "
                "ImageLoader.state_dict() returned (unchanged)"
            )
    loader_state(data, expected_keys=DATASET_KEYS)
    saved = data.get("content")
    same_names = data["fingerprint"] == loader.samples.fingerprint and data["num_samples"] == len(loader.samples)
    if saved is None or not same_names:
        return  # a state from before content digests; or another data set, which resume.py words
    if not isinstance(saved, dict) or not isinstance(saved.get("sizes"), str):
        raise _state_error("dataset.content", saved, "the data set's content digest from state_dict()")
    mine = loader_content(loader)
    if saved["sizes"] == mine["sizes"]:
        return
    changed = sorted(c for c, d in mine.get("classes", {}).items() if saved.get("classes", {}).get(c) != d)
    which = (
        (
            f": the files of class(es) {', '.join(map(repr, changed[:10]))}{' ...' if len(changed) > 10 else ''} "
            "differ in size from the saved run's"
        )
        if changed
        else ": some files differ in size from the saved run's"
    )
    raise StateError(
        f"load_state_dict: {loader.samples.source} has the same file names as the saved run but other contents"
        f"{which} (class folders swapped, or files replaced under the same names?). Resuming would continue "
        "another run's order over other images: restore the data, or start afresh without load_state_dict"
    )
