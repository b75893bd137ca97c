"""Autotuning shared by the kernel launchers.

A launcher hands ``choose`` its candidate configs (first = the default, today's hand-picked
one) and a ``launch(config)`` closure. On a GPU, the first call of each key times every
candidate with ``triton.testing.do_bench`` and keeps the fastest, except that a candidate
whose compile spills registers (``launch`` returns ``kernel[grid](...)``'s compiled kernel)
or does not fit is never kept (if none is left: the default); later calls are a dict
lookup (no sync). So a key costs one compile and a few timed launches per candidate, once
per process. The launched kernels must be idempotent over their outputs (every output
element written, nothing accumulated), which is what makes the timed launches harmless.

- ``UNIPELT_AUTOTUNE=0`` pins every launcher to its default config (no timing, no extra
  compiles): for tests, the GPU suite's parity part, and reproducible runs.
- Under the interpreter and on CPU tensors, launchers pass one config, so nothing is timed.
- ``unipelt-fast resources`` sets ``RECORD_ALL``: ``choose`` then launches every candidate
  once (the report records and compiles each) and returns the default.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

C = TypeVar("C")

RECORD_ALL = False  # set by unipelt_fast.resources while it records launches
_CHOSEN: dict[tuple[str, Hashable], object] = {}


def enabled() -> bool:
    """Whether launchers autotune (``UNIPELT_AUTOTUNE`` is not ``0``)."""
    return os.environ.get("UNIPELT_AUTOTUNE", "1") != "0"


def choose(name: str, key: Hashable, configs: Sequence[C], launch: Callable[[C], None]) -> C:
    """The config to launch ``name`` with for ``key`` (see the module docstring)."""
    if not configs:
        raise ValueError(f"{name}: no candidate configs")
    if RECORD_ALL:
        for c in configs[1:]:
            launch(c)
        return configs[0]
    if len(configs) == 1 or not enabled():
        return configs[0]
    hit = _CHOSEN.get((name, key))
    if hit is None:
        hit = configs[_fastest(configs, launch)]
        _CHOSEN[(name, key)] = hit
    return hit  # type: ignore[return-value]


def _fastest(configs: Sequence[C], launch: Callable[[C], None]) -> int:
    from triton.runtime.errors import OutOfResources
    from triton.testing import do_bench

    times = []
    for c in configs:
        try:
            if spills(launch(c)):  # the compile of this GPU spills registers: never chosen
                times.append(math.inf)
                continue
            times.append(do_bench(lambda c=c: launch(c), warmup=5, rep=25))
        except OutOfResources:  # e.g. too much shared memory on this GPU: never chosen
            times.append(math.inf)
    return min(range(len(configs)), key=times.__getitem__)  # all inf: the default


def spills(launched: object) -> bool:
    """Whether what a ``launch(config)`` returned (Triton's compiled kernel, as
    ``kernel[grid](...)`` returns it, or a list of them; None where the launcher returns
    nothing) spills registers, by ptxas's count."""
    kernels = launched if isinstance(launched, (list, tuple)) else [launched]
    return any((getattr(k, "n_spills", 0) or 0) > 0 for k in kernels)


def chosen() -> dict[str, object]:
    """What each (launcher, key) picked so far, for benchmark logs (tuples as lists, other
    configs as their repr, so the result is JSON-ready)."""
    return {
        f"{n}{k!r}": list(c) if isinstance(c, tuple) else repr(c) for (n, k), c in _CHOSEN.items()
    }


def reset() -> None:
    """Forget every choice (tests; benchmarks that compare before/after)."""
    _CHOSEN.clear()
