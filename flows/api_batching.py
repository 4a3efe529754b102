"""The micro-batcher of `radflow serve-api` (flows/api.py): one thread holds the model and runs every
forward pass waiting as one batch, so requests share passes and the model lock is held for the
forward pass only (screening, decoding and preprocessing run in each request's own thread).
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class RequestTimedOut(Exception):
    """The request's deadline passed while it waited for, or in, the forward pass."""


@dataclass
class _Pending:
    model: Any
    batch: np.ndarray
    future: Future[np.ndarray] = field(default_factory=Future)


class MicroBatcher(threading.Thread):
    """One thread runs the model: it takes every forward pass waiting (up to `max_batch` images,
    waiting `wait_s` for company after the first), runs them as one `predict_on_batch` under
    `lock`, and hands each caller its rows. Callers decode and preprocess in their own threads."""

    def __init__(self, lock: threading.Lock, max_batch: int, wait_s: float) -> None:
        super().__init__(name="radflow-micro-batcher", daemon=True)
        self.lock, self.max_batch, self.wait_s = lock, max(1, max_batch), max(0.0, wait_s)
        self.queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self.batches = 0  # forward passes run (for tests and /healthz)
        self.largest = 0  # most images in one pass

    def submit(self, model: Any, batch: np.ndarray) -> Future[np.ndarray]:
        pending = _Pending(model, np.ascontiguousarray(batch))
        self.queue.put(pending)
        return pending.future

    def stop(self) -> None:
        self.queue.put(None)

    def run(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            waiting, images = [first], len(first.batch)
            until = time.monotonic() + self.wait_s
            stopping = False
            while images < self.max_batch:
                try:
                    item = self.queue.get(timeout=max(0.0, until - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                waiting.append(item)
                images += len(item.batch)
            for group in _groups(waiting):
                self._forward(group)
            if stopping:
                return

    def _forward(self, group: list[_Pending]) -> None:
        live = [p for p in group if p.future.set_running_or_notify_cancel()]  # skip timed-out ones
        if not live:
            return
        batch = np.concatenate([p.batch for p in live])
        n = len(batch)
        padded = padded_size(n)
        if padded > n:
            filler = np.zeros((padded - n, *batch.shape[1:]), batch.dtype)
            batch = np.concatenate([batch, filler])
        try:
            with self.lock:
                out = np.asarray(live[0].model.predict_on_batch(batch))[:n]
        except Exception as exc:  # noqa: BLE001 - handed to each caller, who reports it
            for p in live:
                p.future.set_exception(exc)
            return
        self.batches += 1
        self.largest = max(self.largest, len(out))
        start = 0
        for p in live:
            p.future.set_result(out[start : start + len(p.batch)])
            start += len(p.batch)


def _groups(waiting: list[_Pending]) -> list[list[_Pending]]:
    """Passes that can share a forward pass: same model object, same image shape."""
    groups: dict[tuple[int, tuple[int, ...]], list[_Pending]] = {}
    for p in waiting:
        groups.setdefault((id(p.model), p.batch.shape[1:]), []).append(p)
    return list(groups.values())


class BatchedModel:
    """Stands in for the Keras model in the prediction core: its forward passes go to the batcher,
    and give up at the request's deadline."""

    def __init__(self, batcher: MicroBatcher, model: Any, deadline: float) -> None:
        self.batcher, self.model, self.deadline = batcher, model, deadline

    def predict_on_batch(self, batch: np.ndarray) -> np.ndarray:
        future = self.batcher.submit(self.model, batch)
        try:
            return future.result(timeout=max(0.0, self.deadline - time.monotonic()))
        except (FutureTimeout, CancelledError):
            future.cancel()  # still queued: the batcher skips it
            raise RequestTimedOut from None


def padded_size(n: int) -> int:
    """The batch size a pass of n images runs at: the next power of two. Keras traces its predict
    function for new input shapes (until TensorFlow relaxes the batch dimension) and, for a model
    compiled with `jit_compile`, XLA compiles once per shape; a few fixed sizes, all run once at
    start-up, keep tracing and compiling out of the requests' time."""
    return 1 << max(0, n - 1).bit_length()


def warm_up(model: Any, input_size: int, max_batch: int) -> None:
    """Compile the model's predict function for every batch size it will run at."""
    sizes = sorted({padded_size(n) for n in range(1, max(1, max_batch) + 1)})
    for n in sizes:
        model.predict_on_batch(np.zeros((n, input_size, input_size, 1), np.float32))
