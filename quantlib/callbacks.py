"""The callback types every long step takes, declared once.

`ProgressFn(fraction, message)` is told how far a step is (0..1) and what it is doing; `CancelFn()` is asked
between units of work and a True answer stops the step with `quantlib.errors.Cancelled`.
"""

from __future__ import annotations

from typing import Callable

#: Told how far a step is (0..1) and what it is doing.
ProgressFn = Callable[[float, str], None]
#: Asked between units of work; True stops the step (`quantlib.errors.Cancelled`).
CancelFn = Callable[[], bool]
