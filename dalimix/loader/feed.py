"""The pipeline's life: ONE DALI pipeline per loader, fed batch by batch in reading order.

The pipeline is built on first use and kept across epochs, ``set_epoch``, resume and skipped files
(it is rebuilt only after DALI itself failed on a file, or to restore an ``auto_augment`` preset's
DALI checkpoint). ``PipelineFeed.take(epoch, step)`` returns that batch: up to ``prefetch`` batches
are fed and scheduled ahead, running on into the next epoch, so an epoch boundary never drains
DALI. When the loop asks for another batch than the one queued (another epoch by ``set_epoch``, a
resume), the queued batches are run and thrown away (all random draws are dalimix's, so nothing
downstream changes).

Output lifetime on CUDA: DALI's outputs are shared on the consumer's current stream
(``share_outputs(cuda_stream=...)``, DALI's dynamic executor) and handed back by dropping them once
the fused kernel that reads them has been enqueued on that stream: their memory is freed in stream
order, and the host never waits for the GPU in ``next()``.
"""

from __future__ import annotations

import inspect
from collections import deque
from typing import Any

import numpy as np
import torch

from ..pipeline import build_pipeline, encoded_size, feed
from ..sources import ReadBuffer
from .plan import Ticket, Traversal, draw_augment


class PipelineFeed:
    """The loader's DALI pipeline and the batches queued in it."""

    def __init__(
        self,
        *,
        samples,
        spec,
        device: torch.device,
        batch_size: int,
        num_threads: int,
        prefetch: int,
        seed: int,
        dali_seed: int,
        shard_id: int,
        traversal: Traversal,
        recovery,
        checkpointing: bool,
    ):
        self.samples = samples
        self.spec = spec
        self.device = device
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.prefetch = prefetch
        self.seed = seed
        self.dali_seed = dali_seed
        self.shard_id = shard_id
        self.traversal = traversal
        self.recovery = recovery
        self.checkpointing = checkpointing
        self.builds = 0  # DALI pipelines built so far (1 for a loader's whole life unless a file failed)
        self._pipe: Any = None  # the DALI pipeline (DALI is not type-analysed), built on first use
        self._pending: deque = deque()  # (ticket, flips, encoded, buffer) fed and scheduled, outputs not yet taken
        self._next: tuple[int, int] | None = None  # (epoch, step) fed next
        self._held = None  # DALI outputs of the batch handed out last
        self._held_buffer = None  # the ReadBuffer its encoded bytes were read into
        self._buffers: list[ReadBuffer] = []  # free: DALI released the batches read into them
        self._buffered = "buffer" in inspect.signature(samples.read_batch).parameters
        self._consumed: Any = (
            None  # CUDA: event after the last kernel that read DALI's outputs (waited on at close only)
        )
        self._restore = None  # DALI checkpoint to build the next pipeline from
        self._last_checkpoint = None
        n = len(samples)
        self._sizes: np.ndarray = np.zeros((n, 2), dtype=np.int32)
        self._known: np.ndarray = np.zeros(n, dtype=bool)

    # ------------------------------------------------------------------ one batch
    def take(self, epoch: int, step: int):
        """(ticket, uint8 images ``N x H x W x 3`` in DALI's memory, flips) of batch ``step`` of ``epoch``."""
        self.release()
        key = (epoch, step)
        while True:
            if self._pending and self._pending[0][0].key != key:
                self._discard()
            if not self._pending:
                self._next = key
            self._fill()
            ticket, flips, _, _ = self._pending[0]
            try:
                outputs = self._share()
            except RuntimeError as e:
                ids = list(dict.fromkeys(int(i) for t, _, _, _ in self._pending for i in t.ids))
                self._drop()  # DALI cannot go on after a failed batch: the next batch rebuilds it
                self.recovery.handle(e, ids, ticket.epoch, ticket.step)  # raises, or marks files to replace
                self.traversal.invalidate()
                continue
            self._held_buffer = self._pending.popleft()[3]
            self._held = outputs
            images_tl, ids_tl = outputs
            got = np.asarray(ids_tl.as_tensor()).reshape(-1)
            if not np.array_equal(got, ticket.ids):
                raise RuntimeError(
                    f"dalimix: DALI returned samples {got[:4].tolist()}... for epoch {epoch} step {step}, "
                    f"which was fed {ticket.ids[:4].tolist()}..."
                )
            if self.checkpointing:
                self._last_checkpoint = self._pipe.checkpoint()
            return ticket, torch.from_dlpack(images_tl.as_tensor()), flips

    def consumed(self) -> None:
        """The batch taken last has been read by work enqueued on the current stream (CUDA: an event
        is recorded, never waited on in the hot path)."""
        if self.device.type == "cuda":
            self._consumed = torch.cuda.Event()
            self._consumed.record(torch.cuda.current_stream(self.device))

    def release(self) -> None:
        """Hand the last batch's DALI buffers back (CUDA: freed in the consumer stream's order)."""
        if self._held is not None:
            self._held = None
            if self._pipe is not None:
                self._pipe.release_outputs()
                self._recycle(self._held_buffer)
            self._held_buffer = None

    def checkpoint(self):
        """DALI's state after the batch taken last (only with ``checkpointing``: preset random streams)."""
        return self._last_checkpoint

    def restore(self, checkpoint) -> None:
        """Continue DALI's own random streams from ``checkpoint`` (rebuilds the pipeline once)."""
        self._drop()
        self._restore = checkpoint
        self._last_checkpoint = checkpoint

    def close(self) -> None:
        self._drop()

    # ------------------------------------------------------------------ internals
    def _share(self):
        if self.device.type == "cuda":
            return self._pipe.share_outputs(cuda_stream=torch.cuda.current_stream(self.device))
        return self._pipe.share_outputs()

    def _build(self) -> Any:
        self._pipe = pipe = build_pipeline(
            spec=self.spec,
            device=self.device,
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            seed=self.dali_seed,
            prefetch=self.prefetch,
            checkpointing=self.checkpointing,
            checkpoint=self._restore,
        )
        self._restore = None
        self.builds += 1
        return pipe

    def _fill(self) -> None:
        if self._pipe is None:
            # a fresh pipeline's first schedule_run runs `prefetch` iterations: feed them all first
            pipe = self._build()
            for _ in range(self.prefetch - len(self._pending)):
                self._feed_one()
            pipe.schedule_run()
            return
        while len(self._pending) < self.prefetch:
            self._feed_one()
            self._pipe.schedule_run()

    def _feed_one(self) -> None:
        assert self._next is not None  # set by take() before anything is fed
        ticket = self.traversal.ticket(*self._next)
        buffer = self._buffers.pop() if self._buffers else ReadBuffer()
        encoded = self._read(ticket, buffer)
        windows, flips = draw_augment(self.spec, self.seed, self.shard_id, ticket, self._sizes_of(ticket.ids, encoded))
        feed(self._pipe, encoded, ticket.ids, windows)
        # DALI reads `encoded` in place until the batch is out: `buffer` is reused only after its release
        self._pending.append((ticket, flips, encoded, buffer))
        self._next = self.traversal.after(self._next)

    def _read(self, ticket: Ticket, buffer: ReadBuffer) -> list:
        kw = {"buffer": buffer} if self._buffered else {}
        try:
            return self.samples.read_batch(ticket.ids, **kw)
        except OSError:  # a file vanished or cannot be opened: DALI fails on it, recovery names it
            buffer.clear()
            out = []
            for i in ticket.ids:
                try:
                    out += self.samples.read_batch([i], **kw)
                except OSError:
                    out.append(np.zeros(0, dtype=np.uint8))
            return out

    def _recycle(self, buffer: ReadBuffer | None) -> None:
        if buffer is not None:
            buffer.clear()
            self._buffers.append(buffer)

    def _sizes_of(self, ids: np.ndarray, encoded: list) -> np.ndarray:
        """Decoded (height, width) of each sample, parsed from its header once and remembered."""
        if not self.spec.train:
            return self._sizes[ids]
        for k in np.flatnonzero(~self._known[ids]):
            i = int(ids[k])
            self._sizes[i] = encoded_size(encoded[k])
            self._known[i] = True
        return self._sizes[ids]

    def _discard(self) -> None:
        """Run the queued batches and throw them away (they were read ahead for another request)."""
        while self._pending and self._pipe is not None:
            try:
                self._share()
                self._pipe.release_outputs()
            except RuntimeError:
                self._drop()
                break
            self._recycle(self._pending.popleft()[3])  # only now: DALI read its bytes in place
        self._pending.clear()

    def _drop(self) -> None:
        if self._consumed is not None:  # shutting DALI down: let the last kernel finish reading its memory
            self._consumed.synchronize()
            self._consumed = None
        self._held = None
        self._held_buffer = None  # neither it nor the pending batches' buffers are reused
        pipe, self._pipe = self._pipe, None
        del pipe  # DALI's threads stop here, before the bytes they may still read are let go
        self._pending.clear()
