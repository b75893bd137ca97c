"""Counting what one call runs: the Triton launches of a kernel module, and the torch ops
called around them (not the interpreter's own tensor copies inside a launch)."""

from __future__ import annotations

import importlib

from torch.utils._python_dispatch import TorchDispatchMode

# Allocation, NaN fill (UNIPELT_NAN_FILL) and metadata-only ops: no arithmetic.
NO_COMPUTE = {
    "aten.empty",
    "aten.empty_like",
    "aten.empty_strided",
    "aten.new_empty",
    "aten.full",
    "aten.fill_",
    "aten.t",
    "aten.view",
    "aten.detach",
}


class Counter(TorchDispatchMode):
    """Inside ``with counter:``, ``launches`` gets the name of each launch of the given
    kernel modules' JIT kernels and ``ops`` each torch op called outside those launches.
    A custom op counts as one op (the mode does not see inside it)."""

    def __init__(self, monkeypatch, *modules: str):
        super().__init__()
        self.launches: list[str] = []
        self.ops: list[str] = []
        self._in_launch = False
        for mname in modules:
            mod = importlib.import_module(f"unipelt_fast.kernels.{mname}")
            for name, fn in vars(mod).copy().items():
                if name.endswith("_kernel") and hasattr(fn, "__getitem__"):
                    monkeypatch.setattr(mod, name, _Counted(self, name, fn))

    def clear(self) -> None:
        self.launches.clear()
        self.ops.clear()

    def compute_ops(self) -> list[str]:
        return [op for op in self.ops if op not in NO_COMPUTE]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._in_launch:
            self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


class _Counted:
    def __init__(self, counter: Counter, name: str, fn):
        self.counter, self.name, self.fn = counter, name, fn

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            c = self.counter
            c.launches.append(self.name)
            c._in_launch = True
            try:
                return self.fn[grid](*args, **kwargs)
            finally:
                c._in_launch = False

        return launch
