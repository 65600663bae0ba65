"""Previews rendered off the decode thread (SPEC section 7: a preview never stalls a batch).

At a tick the decode thread hands a job's partial codes (a small CPU copy of the int grid: the renderer
never touches the decoder's own tensors) to `PreviewRenderer.submit` and goes on at once. A render thread
turns grids into images (VQ-GAN decode of the partial grid, whose weights it only reads; grey unsampled
cells; JPEG) and calls the job's `deliver`. A job holds at most one pending grid: a newer tick replaces
it, so a renderer slower than the ticks skips stale grids and always draws the newest one next. At most one
render thread runs at a time, so a job's previews are delivered in step order.

Before a job's result goes out, its previews are settled, so that none is delivered after the result:
`close(key)` drops its pending grid and disowns one being drawn (delivered under the same lock, so
after `close` returns nothing of the job is delivered; the decode never waits for a render), and
`flush(key)` waits until its newest grid has been drawn and delivered.

Rendering is budgeted so that it cannot take the decode's time where both share a few CPU cores: after a
render of r seconds the renderer rests r * (1 / PREVIEW_SHARE - 1) seconds before the next one (the grids
meanwhile coalesce to the newest), so previews spend at most PREVIEW_SHARE of the wall time; a `flush`
does not wait for the rest. Renders run at a lower CPU priority (nice `PREVIEW_NICE`, which the OpenMP
threads they start inherit). And the render thread ends whenever it has nothing to draw now, rest
included: a second thread that has used OpenMP, while it lives, puts GNU OpenMP in its throttled mode
(more threads than cores), which measured the decode's small products 2x slower (bench/preview.py),
previews or not. On a GPU a render takes milliseconds and none of this is felt. (The render thread's
intra-op thread count is left alone: torch's setting is process-wide for the threads that start later,
and MKL's thread count changes the bits of a seed's images.)
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable

import torch

log = logging.getLogger(__name__)

#: What a job's preview goes to: (the step the grid is of, one base64 JPEG per image).
Deliver = Callable[[int, list[str]], None]
#: Partial codes [n, image_seq_length] long on the CPU (-1: not sampled yet) -> one base64 JPEG per image.
Render = Callable[[torch.Tensor], list[str]]
#: How much nicer than the decode a render thread runs (Linux: per thread).
PREVIEW_NICE = 5
#: The most of the wall time the renderer spends rendering (it rests in between).
PREVIEW_SHARE = 0.15
#: At exit, how long to wait for a render under way (a thread killed inside torch aborts the process).
STOP_TIMEOUT_S = 30.0


class PreviewRenderer:
    """Draws the newest grid of each job on a render thread ("kandinsky-previews", one at a time).

    `device`: where `render` runs; on CUDA renders use their own stream, so the decoder's kernels never
    queue behind a preview's (the VQ-GAN weights are shared, read-only).
    """

    THREAD_NAME = "kandinsky-previews"

    def __init__(self, render: Render, device: torch.device | str | None = None) -> None:
        self._render = render
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._stream: torch.cuda.Stream | None = None
        self._pending: collections.OrderedDict[Hashable, tuple[int, torch.Tensor, Deliver]] = (
            collections.OrderedDict()
        )
        self._cond = threading.Condition()
        self._worker: threading.Thread | None = None  # the render thread, while one runs
        self._timer: threading.Timer | None = None  # starts one when a rest is over
        self._busy: Hashable | None = None  # the job whose grid is being drawn now
        self._disowned = False  # the grid being drawn was closed meanwhile: not delivered
        self._delivered: dict[Hashable, int] = {}  # job -> step of its last preview delivered
        self._rest_until = 0.0  # time.monotonic() before which only a flushed job's grid is drawn
        self._urgent: set[Hashable] = set()  # jobs being flushed
        self._stopping = False
        self._at_exit = False
        self.skipped = 0  # grids replaced by a newer one, or dropped, before they were drawn
        self.rendered = 0  # previews delivered

    # ---- the decode's side ------------------------------------------------------------------------

    def submit(self, key: Hashable, step: int, partial: torch.Tensor, deliver: Deliver) -> None:
        """Queue job `key`'s grid at `step` (partial codes [n, seq] on the CPU, -1 unsampled), replacing
        a pending older one. Never waits for the renderer."""
        with self._cond:
            if self._stopping:  # the process is going down: nobody will see it
                self.skipped += 1
                return
            if self._pending.pop(key, None) is not None:
                self.skipped += 1
            self._pending[key] = (step, partial, deliver)  # at the end: jobs take turns
            self._start()

    def drop(self, key: Hashable) -> None:
        """Forget job `key`'s pending grid (a stopped job); never waits."""
        with self._cond:
            if self._pending.pop(key, None) is not None:
                self.skipped += 1

    def close(self, key: Hashable) -> int:
        """No more previews of `key`, from the moment this returns (it never waits): its pending grid is
        dropped, one being drawn is not delivered. Returns the step of its last preview delivered, or 0."""
        with self._cond:
            self.drop(key)
            if self._busy == key:
                self._disowned = True
            return self._delivered.pop(key, 0)

    def flush(self, key: Hashable) -> int:
        """Wait until job `key`'s newest grid is drawn and delivered (it is drawn next), then close it."""
        with self._cond:
            if key in self._pending:
                self._pending.move_to_end(key, last=False)
                self._urgent.add(key)
                self._start()
            try:
                while key in self._pending or self._busy == key:
                    self._cond.wait()
            finally:
                self._urgent.discard(key)
            return self.close(key)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is pending or being drawn (benchmarks, tests); False if `timeout` ran out."""
        with self._cond:
            return self._cond.wait_for(lambda: self._busy is None and not self._pending, timeout)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Drop every pending grid and wait for a render under way (called at exit: a thread still inside
        torch when the interpreter goes down aborts the process)."""
        with self._cond:
            self._stopping = True
            self.skipped += len(self._pending)
            self._pending.clear()
            if self._timer is not None:
                self._timer.cancel()
            worker = self._worker
            self._cond.notify_all()
        if worker is not None:
            worker.join(timeout)

    # ---- the render thread ------------------------------------------------------------------------

    def _ready(self) -> bool:
        """A grid may be drawn now: one is pending and the rest is over, or a flushed job's is first."""
        if not self._pending or self._stopping:
            return False
        return time.monotonic() >= self._rest_until or next(iter(self._pending)) in self._urgent

    def _start(self) -> None:
        """(Holding the lock.) A render thread if a grid may be drawn now and none runs; else, when the
        rest is what holds it back, a timer that tries again once it is over."""
        if self._worker is not None or not self._pending or self._stopping:
            return
        if not self._ready():
            if self._timer is None:
                self._timer = threading.Timer(self._rest_until - time.monotonic(), self._rested)
                self._timer.daemon = True
                self._timer.start()
            return
        if not self._at_exit:
            atexit.register(self.stop)
            self._at_exit = True
        self._worker = threading.Thread(target=self._run, name=self.THREAD_NAME, daemon=True)
        self._worker.start()

    def _rested(self) -> None:
        with self._cond:
            self._timer = None
            self._start()

    def _run(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PREVIEW_NICE)  # this thread only
        except (AttributeError, OSError):  # not Linux, or not allowed: renders just compete
            log.debug("preview renderer: could not lower its CPU priority")
        if self._device.type == "cuda" and self._stream is None:
            self._stream = torch.cuda.Stream(self._device)
        while True:
            with self._cond:
                if not self._ready():  # nothing to draw now: this thread ends (see the module's notes)
                    self._worker = None
                    self._start()
                    self._cond.notify_all()
                    return
                key, (step, partial, deliver) = self._pending.popitem(last=False)  # waited longest
                self._busy, self._disowned = key, False
            t0 = time.monotonic()
            try:
                stream = self._stream
                on_stream = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
                with on_stream, torch.inference_mode():
                    images = self._render(partial)
                with self._cond:  # one lock with close(): a closed job gets nothing from here on
                    if not self._disowned:
                        deliver(step, images)  # must not block: it hands the preview on
                        self._delivered[key] = step
                        self.rendered += 1
            except Exception:  # a preview never costs a job its result, nor the renderer its thread
                log.exception("preview rendering failed")
            finally:
                with self._cond:
                    self._busy = None
                    now = time.monotonic()
                    self._rest_until = now + (now - t0) * (1 / PREVIEW_SHARE - 1)
                    self._cond.notify_all()
