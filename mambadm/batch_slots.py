"""Batch buffers a DataLoader worker reuses instead of allocating new shared memory for every batch.

A loader worker hands each batch to the training process in shared memory. New shared memory costs a page fault
and a zeroed page for every 4 KiB written: on the dev box that write runs at 1.78 GB/s against 12.6 GB/s for a
plain copy (benchmarks/RESULTS.md, "Shards, format version 2"), and it, not decoding, bounded a worker. Here each
worker keeps a ring of batch buffers (a *slot* holds one batch's tensors). The training process hands a slot back
once everything it received in it has been freed (each tensor's storage unreferenced, views included) by clearing
one shared flag; a worker whose slots are all held allocates a new buffer, as before. So a consumer that keeps
batches (a list of them, a test) always gets its own numbers; the worker never waits.

    worker:  slots.tensors({"rtg": ((B, K), torch.float32), ...}) -> tensors to fill, returned with SLOT_KEY
    main:    SlotReturningIter pops SLOT_KEY from each batch and clears the flags of freed slots
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import get_worker_info

SLOT_KEY = "_slot"  # (worker, slot) of a batch; -1 when its tensors are not a reusable slot's
SLOTS_PER_WORKER = 8  # >= prefetch_factor (4) + the batch in use + the one before it + the pin-memory thread's


def shared_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in new shared memory (as torch's own ``default_collate`` allocates in a worker)."""
    elem = torch.empty(0, dtype=dtype)
    return elem.new(elem._typed_storage()._new_shared(math.prod(shape), device=elem.device)).resize_(shape)


class BatchSlots:
    """One loader iteration's slot flags (shared by the main process and its workers) and a worker's buffers."""

    def __init__(self, workers: int, slots: int = SLOTS_PER_WORKER):
        self.held = torch.zeros((workers, slots), dtype=torch.uint8).share_memory_()  # 1: the main process has it
        self.buffers: dict[int, dict[str, torch.Tensor]] = {}  # worker side: slot -> its tensors

    def tensors(self, layout: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> tuple[int, dict[str, torch.Tensor]]:
        """In a worker: ``(slot, tensors)`` of the requested shapes to fill and send, from a free slot (its buffers
        reused when their shapes match), or ``(-1, new tensors)`` when every slot is held."""
        worker = get_worker_info().id
        flags = self.held[worker]
        for slot in range(len(flags)):
            if flags[slot]:
                continue
            buffers = self.buffers.get(slot)
            if buffers is None or any(buffers[k].shape != shape or buffers[k].dtype != dtype
                                      for k, (shape, dtype) in layout.items()):
                buffers = self.buffers[slot] = {k: shared_tensor(*spec) for k, spec in layout.items()}
            flags[slot] = 1
            return slot, buffers
        return -1, {k: shared_tensor(*spec) for k, spec in layout.items()}


class SlotReturningIter:
    """The main process's side: wraps a DataLoader iterator, drops SLOT_KEY from each batch and, before fetching the
    next batch, hands back the slots whose tensors are all freed. Other attributes are the wrapped iterator's."""

    def __init__(self, inner: Iterator, slots: BatchSlots):
        self.inner, self.slots = inner, slots
        self.out: list[tuple[int, int, list[StorageWeakRef]]] = []  # slots the consumer may still hold

    def __iter__(self) -> SlotReturningIter:
        return self

    def __next__(self):
        self.out = [(w, s, refs) for w, s, refs in self.out if not self._returned(w, s, refs)]
        batch = next(self.inner)
        if isinstance(batch, dict) and SLOT_KEY in batch:
            worker, slot = (int(v) for v in batch.pop(SLOT_KEY))
            if slot >= 0:
                self.out.append((worker, slot, [StorageWeakRef(t.untyped_storage()) for t in batch.values()
                                                if isinstance(t, torch.Tensor)]))
        return batch

    def _returned(self, worker: int, slot: int, refs: list[StorageWeakRef]) -> bool:
        if not all(r.expired() for r in refs):
            return False
        self.slots.held[worker, slot] = 0
        return True

    def __getattr__(self, name: str):
        return getattr(self.inner, name)
