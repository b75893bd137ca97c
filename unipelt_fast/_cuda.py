"""CUDA C++ fallback (backend="cuda"): the build, and per-op wrappers.

Which extension runs, in order:

1. ``unipelt_fast._C``, built ahead of time by ``UNIPELT_BUILD_CUDA=1 pip install
   --no-build-isolation .``, when it imports;
2. a just-in-time build of ``csrc/`` with ``torch.utils.cpp_extension.load`` (ninja), on the
   first call of a cuda-backend op, into ``<cache>/cuda-<hash>``. The cache is
   ``$UNIPELT_CUDA_CACHE``, else ``$XDG_CACHE_HOME/unipelt_fast``, else
   ``~/.cache/unipelt_fast``; the hash covers the sources, torch and CUDA versions, the arch
   list, the flags and the Python ABI, so later processes reuse the build and any change
   rebuilds. The arch list is ``TORCH_CUDA_ARCH_LIST`` when set, else the compute
   capabilities of the visible GPUs.

A failed build raises one RuntimeError with the tail of the compiler output and the path of
the full log. The per-op implementations below keep the backend contract of docs/ops.md;
outputs are allocated here with ``new_output`` and filled by the extension.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch

from . import _atomic
from ._alloc import new_output
from ._validation import ACTIVATIONS, check_cuda_features

Tensor = torch.Tensor

# Activation ids: the order of UfAct in csrc/launchers.h (checked by a test).
ACT_ID = {name: i for i, name in enumerate(ACTIVATIONS)}
# Activations whose backward needs the saved pre-activation (relu reads y, identity nothing).
_NEEDS_PRE = ("gelu", "gelu_tanh", "silu", "tanh")
GATE_MODE_ID = {None: 0, "token": 1, "mean": 2}

SOURCE_SUFFIXES = (".cu", ".cpp")
HEADER_SUFFIXES = (".cuh", ".h")
CUDA_FLAGS = ("-O3",)  # no --use_fast_math: fp32 parity needs full-precision exp/erf/tanh
CXX_FLAGS = ("-O3",)
_ARCH_NAMES = {"Kepler", "Maxwell", "Pascal", "Volta", "Turing", "Ampere", "Ada", "Hopper"}


# ---- build configuration (pure python, testable without a GPU) -----------------------------


def source_dir() -> Path:
    """The directory holding the CUDA sources (installed as ``unipelt_fast.csrc``)."""
    spec = importlib.util.find_spec("unipelt_fast.csrc")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parent.parent / "csrc"  # a source checkout


def source_files(directory: Path) -> tuple[list[Path], list[Path]]:
    """(compiled sources, headers) of ``directory``, sorted by name."""
    files = sorted(p for p in directory.iterdir() if p.is_file())
    return (
        [p for p in files if p.suffix in SOURCE_SUFFIXES],
        [p for p in files if p.suffix in HEADER_SUFFIXES],
    )


def parse_arch_list(text: str) -> str:
    """Normalise a ``TORCH_CUDA_ARCH_LIST`` value to torch's ``"8.0;9.0"`` form.

    Accepts ``;``, ``,`` or space separators, entries such as ``8.0``, ``9.0a``,
    ``8.6+PTX``, ``sm_80``, ``sm_90a``, ``80``, and torch's arch names (``Ampere``).
    Raises ValueError naming the entry it does not understand.
    """
    out: list[str] = []
    for tok in (t for t in re.split(r"[;,\s]+", text.strip()) if t):
        ptx = tok.endswith("+PTX")
        core = tok[: -len("+PTX")] if ptx else tok
        m = re.fullmatch(r"(\d+)\.(\d)(a?)", core)
        m2 = re.fullmatch(r"(?:sm_|compute_)?(\d+)(\d)(a?)", core)
        if m:
            norm = f"{int(m.group(1))}.{m.group(2)}{m.group(3)}"
        elif m2:
            norm = f"{int(m2.group(1))}.{m2.group(2)}{m2.group(3)}"
        elif core in _ARCH_NAMES:
            norm = core
        else:
            raise ValueError(
                f"TORCH_CUDA_ARCH_LIST: cannot read {tok!r} in {text!r}; use entries such as "
                "'8.0', '9.0a', '8.6+PTX' or 'sm_80', separated by ';'"
            )
        norm += "+PTX" if ptx else ""
        if norm not in out:
            out.append(norm)
    if not out:
        raise ValueError(f"TORCH_CUDA_ARCH_LIST is set but lists no architecture: {text!r}")
    return ";".join(out)


def detect_arch_list(capabilities: list[tuple[int, int]] | None = None) -> str:
    """The arch list of the visible GPUs (or of ``capabilities``), e.g. ``"8.0;9.0"``."""
    if capabilities is None:
        if not torch.cuda.is_available():
            raise RuntimeError(
                "unipelt_fast: no CUDA device to detect the arch list from; set "
                "TORCH_CUDA_ARCH_LIST (e.g. '8.0;9.0') to build the CUDA extension"
            )
        capabilities = [
            torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())
        ]
    archs = sorted(set(capabilities))
    return ";".join(f"{major}.{minor}" for major, minor in archs)


def arch_list() -> str:
    """``TORCH_CUDA_ARCH_LIST`` (normalised) when set, else the visible GPUs' arch list."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    return parse_arch_list(env) if env else detect_arch_list()


def cache_root() -> Path:
    """Where JIT builds live: $UNIPELT_CUDA_CACHE, $XDG_CACHE_HOME/unipelt_fast, ~/.cache/..."""
    env = os.environ.get("UNIPELT_CUDA_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "unipelt_fast"


def build_hash(
    files: list[Path],
    *,
    arch: str,
    torch_version: str,
    cuda_version: str | None,
    flags: tuple[str, ...],
    python_tag: str,
) -> str:
    """A short stable hash of everything that changes the built binary."""
    h = hashlib.sha256()
    for part in (arch, torch_version, str(cuda_version), " ".join(flags), python_tag):
        h.update(part.encode() + b"\0")
    for p in sorted(files, key=lambda p: p.name):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class BuildSpec:
    name: str
    build_dir: Path
    sources: tuple[Path, ...]
    include_dir: Path
    arch: str

    @property
    def library(self) -> Path:
        return self.build_dir / f"{self.name}.so"

    @property
    def log(self) -> Path:
        return self.build_dir / "build-error.log"


def build_spec(arch: str | None = None, directory: Path | None = None) -> BuildSpec:
    """Name, cache directory and sources of the JIT build for ``arch`` (default: arch_list())."""
    arch = arch_list() if arch is None else arch
    directory = source_dir() if directory is None else directory
    sources, headers = source_files(directory)
    digest = build_hash(
        sources + headers,
        arch=arch,
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
        flags=CUDA_FLAGS + CXX_FLAGS,
        python_tag=sys.implementation.cache_tag or sys.version,
    )
    return BuildSpec(
        name=f"unipelt_fast_cuda_{digest[:12]}",
        build_dir=cache_root() / f"cuda-{digest}",
        sources=tuple(sources),
        include_dir=directory,
        arch=arch,
    )


@functools.lru_cache(maxsize=8)
def _cached_spec(arch_env: str, root: str) -> BuildSpec:
    """build_spec() memoised on its environment: is_built() may run on every op call."""
    return build_spec()


def failure_message(output: str, log: Path, *, tail_lines: int = 40) -> str:
    """The one error a failed build raises: the compiler output's tail and the full log."""
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    tail = "\n".join(lines[-tail_lines:]) if lines else "(no compiler output)"
    return (
        "unipelt_fast: building the CUDA extension for backend='cuda' failed.\n"
        f"--- last {min(tail_lines, len(lines))} lines of the build output ---\n{tail}\n"
        f"--- full log: {log}\n"
        "Check nvcc/CUDA_HOME, ninja and TORCH_CUDA_ARCH_LIST, or use backend='triton' or "
        "backend='eager'."
    )


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _import_library(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def jit_build(spec: BuildSpec, loader: Callable[..., ModuleType] | None = None) -> ModuleType:
    """Import the cached build of ``spec``, or build it with ``loader`` (cpp_extension.load).

    Any failure becomes one RuntimeError (see :func:`failure_message`); the full output is
    written to ``spec.log``.
    """
    if spec.library.exists():
        try:
            return _import_library(spec.name, spec.library)
        except ImportError:
            pass  # a broken cached binary: build it again
    if loader is None:
        from torch.utils.cpp_extension import load as loader
    spec.build_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _env("TORCH_CUDA_ARCH_LIST", spec.arch):  # cpp_extension reads the arch here
            return loader(
                name=spec.name,
                sources=[str(p) for p in spec.sources],
                extra_cflags=list(CXX_FLAGS),
                extra_cuda_cflags=list(CUDA_FLAGS),
                extra_include_paths=[str(spec.include_dir)],
                build_directory=str(spec.build_dir),
                verbose=False,
            )
    except Exception as e:  # noqa: BLE001 - compiler, ninja, CUDA_HOME, import: all one error
        output = f"{type(e).__name__}: {e}"
        try:
            _atomic.write_text(str(spec.log), output)
        except OSError:
            pass
        raise RuntimeError(failure_message(output, spec.log)) from None


# ---- the loaded extension ------------------------------------------------------------------

_lock = threading.Lock()
_ext: ModuleType | None = None
_ext_error: RuntimeError | None = None


@functools.cache
def _import_aot() -> ModuleType | None:
    try:
        return importlib.import_module("unipelt_fast._C")
    except ImportError:
        return None


def extension() -> ModuleType:
    """The extension module, building it on first use (once per process)."""
    global _ext, _ext_error
    if _ext is not None:
        return _ext
    with _lock:
        if _ext is None:
            if _ext_error is not None:  # a failed build is not retried in this process
                raise RuntimeError(str(_ext_error))
            mod = _import_aot()
            if mod is None:
                try:
                    mod = jit_build(build_spec())
                except (RuntimeError, ValueError) as e:
                    _ext_error = RuntimeError(str(e))
                    raise
            _ext = mod
    return _ext


def is_built() -> bool:
    """True when the extension is loaded, built ahead of time, or in the JIT cache for this
    configuration. Never starts a build."""
    if _ext is not None:
        return True
    if _import_aot() is not None:
        return True
    try:
        if not torch.cuda.is_available():
            return False
        return _cached_spec(
            os.environ.get("TORCH_CUDA_ARCH_LIST", ""), str(cache_root())
        ).library.exists()
    except Exception:  # noqa: BLE001 - e.g. a bad TORCH_CUDA_ARCH_LIST: not built
        return False


# ---- per-op implementations (the backend contract of docs/ops.md) ---------------------------
# Each reads the op's argument record (unipelt_fast._args), allocates outputs with new_output
# and has the extension fill them. The extension's argument order is csrc/bindings.cpp's.


def _prefix_attention_forward(a):
    check_cuda_features(a)  # ops raises first; a direct call must not ignore a flag either
    B, H, Lq, _ = a.q.shape
    out = new_output(a.q.shape, a.q.dtype, a.q.device)
    lse = new_output((B, H, Lq), torch.float32, a.q.device)
    extension().prefix_attention_forward(
        *_prefix_attention_inputs(a), bool(a.causal), float(a.softmax_scale), out, lse,
        a.attn_bias,
    )  # fmt: skip
    return out, lse


def _prefix_attention_inputs(a) -> tuple:
    return (a.q, a.k, a.v, a.prefix_k, a.prefix_v, a.prefix_index, a.prefix_gate,
            a.key_padding_mask)  # fmt: skip


def _prefix_attention_backward(a, grad_out, out, lse):
    check_cuda_features(a)
    dev, dt = a.q.device, a.q.dtype
    dq = new_output(a.q.shape, dt, dev)
    dk = new_output(a.k.shape, dt, dev)
    dv = new_output(a.v.shape, dt, dev)
    dpk = new_output(a.prefix_k.shape, dt, dev)
    dpv = new_output(a.prefix_v.shape, dt, dev)
    dg = None if a.prefix_gate is None else new_output((a.q.shape[0], 2), torch.float32, dev)
    extension().prefix_attention_backward(
        grad_out, *_prefix_attention_inputs(a), out, lse, bool(a.causal),
        float(a.softmax_scale), dq, dk, dv, dpk, dpv, dg, a.attn_bias,
    )  # fmt: skip
    return dq, dk, dv, dpk, dpv, dg, None  # no sinks (refused above)


def _gate_mode_id(a) -> int:
    return GATE_MODE_ID[None if a.w_gate is None else a.gate_mode]


def _no_adapter_index(a) -> None:
    # Raised before any launch; the triton and eager backends run both.
    if a.adapter_index is not None:
        raise NotImplementedError(
            "gated_adapter: backend='cuda' does not support adapter_index (mixed-task "
            "batches with per-task stacked weights); use backend='triton' or 'eager'"
        )
    if a.w_up.shape[-2] != a.x.shape[-1]:
        raise NotImplementedError(
            "gated_adapter: backend='cuda' needs d_out == d (w_up (d, r)); use backend="
            "'triton' or 'eager' for a residual of another width"
        )


def _gated_adapter_forward(a):
    _no_adapter_index(a)
    B, L, d = a.x.shape
    M, r = B * L, a.w_down.shape[0]
    mode = _gate_mode_id(a)
    dev = a.x.device
    out = new_output((B, L, d), a.x.dtype, dev)
    z = new_output((M, r), torch.float32, dev)
    s = new_output((M,) if mode else (0,), torch.float32, dev)
    extension().gated_adapter_forward(
        a.x, a.w_down, a.b_down, a.w_up, a.b_up, a.residual, a.w_gate, a.b_gate,
        a.gate_mask if mode == 2 else None, mode, ACT_ID[a.activation], float(a.scaling),
        out, z, s,
    )  # fmt: skip
    return out, z, s


def _gated_adapter_backward(a, grad_out, z, s):
    _no_adapter_index(a)
    dev, dt = a.x.device, a.x.dtype
    mode = _gate_mode_id(a)
    like = lambda t: None if t is None else new_output(t.shape, dt, dev)  # noqa: E731
    dx = new_output(a.x.shape, dt, dev)
    dwd, dbd, dwu, dbu = like(a.w_down), like(a.b_down), like(a.w_up), like(a.b_up)
    dwg = like(a.w_gate)
    dbg = like(a.b_gate) if a.w_gate is not None else None
    extension().gated_adapter_backward(
        grad_out, a.x, a.w_down, a.w_up, a.b_up, a.residual is None, a.w_gate,
        a.gate_mask if mode == 2 else None, z, s, mode, ACT_ID[a.activation],
        float(a.scaling), dx, dwd, dbd, dwu, dbu, dwg, dbg,
    )  # fmt: skip
    return dx, dwd, dbd, dwu, dbu, dwg, dbg


def _bias_only_linear_forward(a):
    M, N = a.x.shape[0], a.weight.shape[0]
    y = new_output((M, N), a.x.dtype, a.x.device)
    pre = new_output((M, N) if a.activation in _NEEDS_PRE else (0,), a.x.dtype, a.x.device)
    extension().bias_only_linear_forward(a.x, a.weight, a.bias, ACT_ID[a.activation], y, pre)
    return y, pre


def _bias_only_linear_backward(a, grad_y, saved):
    dx = new_output((grad_y.shape[0], a.weight.shape[1]), grad_y.dtype, grad_y.device)
    dbias = new_output((a.weight.shape[0],), grad_y.dtype, grad_y.device)
    act = ACT_ID[a.activation]
    extension().bias_only_linear_backward(grad_y, a.weight, saved, act, dx, dbias)
    return dx, dbias


def _bias_only_layer_norm_forward(a):
    M = a.x.shape[0]
    y = new_output(a.x.shape, a.x.dtype, a.x.device)
    mean = new_output((M,), torch.float32, a.x.device)
    rstd = new_output((M,), torch.float32, a.x.device)
    extension().bias_only_layer_norm_forward(a.x, a.weight, a.bias, float(a.eps), y, mean, rstd)
    return y, mean, rstd


def _bias_only_layer_norm_backward(a, grad_y, mean, rstd):
    dx = new_output(a.x.shape, a.x.dtype, a.x.device)
    dbias = new_output(a.weight.shape, a.x.dtype, a.x.device)
    extension().bias_only_layer_norm_backward(grad_y, a.x, a.weight, mean, rstd, dx, dbias)
    return dx, dbias


# The implementations _backend.REGISTRY names, one per op.
prefix_attention = SimpleNamespace(
    forward=_prefix_attention_forward, backward=_prefix_attention_backward
)
gated_adapter = SimpleNamespace(forward=_gated_adapter_forward, backward=_gated_adapter_backward)
bias_only_linear = SimpleNamespace(
    forward=_bias_only_linear_forward, backward=_bias_only_linear_backward
)
bias_only_layer_norm = SimpleNamespace(
    forward=_bias_only_layer_norm_forward, backward=_bias_only_layer_norm_backward
)
_OPS = {
    "prefix_attention": prefix_attention,
    "gated_adapter": gated_adapter,
    "bias_only_linear": bias_only_linear,
    "bias_only_layer_norm": bias_only_layer_norm,
}


def op_module(op: str):
    """The object exposing ``forward``/``backward`` for ``op`` (None for an unknown op).

    Cheap: the extension is loaded (or built) by the first forward/backward call.
    """
    return _OPS.get(op)
