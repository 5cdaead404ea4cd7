"""Layers quantized on worker threads while the caller writes back those already done (`Quantizer.quantize_ahead`).

A method whose quantizer is numpy code (GGUF: numpy releases the GIL in every array operation) keeps both cores
busy this way on small layers too, where slicing one layer's rows (`_gguf_tensor.by_rows`) leaves a core idle.
Each layer is read in the caller's thread when it is handed to a worker. Layers are distinct matrices (distinct
parameters, or distinct experts of one), so reading one before another is written back changes nothing; where two
refs would name the same matrix, the work runs one layer at a time instead.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.overrides import _get_current_function_mode_stack

from quantlib.callbacks import CancelFn
from quantlib.errors import Cancelled

_local = threading.local()


def in_worker() -> bool:
    """True on a worker thread of `quantized_in_turn`: code that would split its own work over threads runs it
    in this one."""
    return getattr(_local, "worker", False)


def _mark_worker() -> None:
    _local.worker = True


def quantized_in_turn(refs: Sequence[Any], work: Callable[[Any, torch.Tensor], Any], workers: int,
                      cancel: CancelFn | None = None, what: str = "quantization",
                      ordered: bool = True) -> Iterator[Any]:
    """`work(ref, ref.read())` for every ref. With `workers` > 0, that many threads work while the caller handles
    results, with at most twice as many layers in flight (their memory); results come in the refs' order, or
    with `ordered=False` as they finish (no layer then waits behind a slower one). With 0, each ref runs in this
    thread when asked for. `cancel` is polled before each ref is read: `Cancelled` names the first not started."""
    def check(ref: Any) -> None:
        if cancel is not None and cancel():
            raise Cancelled(f"{what} cancelled at layer {ref.name}")

    if workers <= 0 or len({(id(ref.param), ref.index) for ref in refs}) < len(refs):
        for ref in refs:
            check(ref)
            yield work(ref, ref.read())
        return
    pending: list[Future] = []
    grad, modes = torch.is_grad_enabled(), _get_current_function_mode_stack()

    def run(ref: Any, w: torch.Tensor) -> Any:
        """`work` under the caller's grad mode and torch function modes (the host-transfer audit's, for one),
        which are the caller thread's own and would not reach a worker otherwise."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.set_grad_enabled(grad))
            for mode in modes:
                stack.enter_context(mode)
            return work(ref, w)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="quantlib-layer", initializer=_mark_worker) as pool:
        try:
            for ref in refs:
                check(ref)
                pending.append(pool.submit(run, ref, ref.read()))
                if len(pending) > 2 * workers:
                    yield _next(pending, ordered)
            while pending:
                yield _next(pending, ordered)
        finally:  # an error, a cancel or a caller that stopped early: nothing more starts; running work finishes
            for future in pending:
                future.cancel()


def _next(pending: list[Future], ordered: bool) -> Any:
    """The result of the first pending future (`ordered`) or of one that has finished, removed from `pending`."""
    if not ordered:
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        future = next(f for f in pending if f in done)
    else:
        future = pending[0]
    pending.remove(future)
    return future.result()
