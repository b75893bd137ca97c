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
the full log. The wrappers below implement the kernel calling convention documented at the
top of ``unipelt_fast/ops.py``; outputs are allocated here with ``new_output`` and filled by
the extension.
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
from ._validation import ACTIVATIONS

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


# ---- per-op wrappers (the calling convention of ops.py) ------------------------------------


def _prefix_attention_forward(
    q,
    k,
    v,
    prefix_k,
    prefix_v,
    prefix_index,
    prefix_gate,
    key_padding_mask,
    causal,
    scale,
    attn_bias=None,
):
    B, H, Lq, _ = q.shape
    out = new_output(q.shape, q.dtype, q.device)
    lse = new_output((B, H, Lq), torch.float32, q.device)
    extension().prefix_attention_forward(
        q,
        k,
        v,
        prefix_k,
        prefix_v,
        prefix_index,
        prefix_gate,
        key_padding_mask,
        bool(causal),
        float(scale),
        out,
        lse,
        attn_bias,
    )
    return out, lse


def _prefix_attention_backward(
    grad_out,
    q,
    k,
    v,
    prefix_k,
    prefix_v,
    prefix_index,
    prefix_gate,
    key_padding_mask,
    out,
    lse,
    causal,
    scale,
    attn_bias=None,
):
    dev, dt = q.device, q.dtype
    dq = new_output(q.shape, dt, dev)
    dk = new_output(k.shape, dt, dev)
    dv = new_output(v.shape, dt, dev)
    dpk = new_output(prefix_k.shape, dt, dev)
    dpv = new_output(prefix_v.shape, dt, dev)
    dg = None if prefix_gate is None else new_output((q.shape[0], 2), torch.float32, dev)
    extension().prefix_attention_backward(
        grad_out,
        q,
        k,
        v,
        prefix_k,
        prefix_v,
        prefix_index,
        prefix_gate,
        key_padding_mask,
        out,
        lse,
        bool(causal),
        float(scale),
        dq,
        dk,
        dv,
        dpk,
        dpv,
        dg,
        attn_bias,
    )
    return dq, dk, dv, dpk, dpv, dg


def _gate_mode_id(w_gate, gate_mode) -> int:
    return GATE_MODE_ID[None if w_gate is None else gate_mode]


def _no_adapter_index(adapter_index, x, w_up) -> None:
    # Raised before any launch; the triton and eager backends run both.
    if adapter_index is not None:
        raise NotImplementedError(
            "gated_adapter: backend='cuda' does not support adapter_index (mixed-task "
            "batches with per-task stacked weights); use backend='triton' or 'eager'"
        )
    if w_up.shape[-2] != x.shape[-1]:
        raise NotImplementedError(
            "gated_adapter: backend='cuda' needs d_out == d (w_up (d, r)); use backend="
            "'triton' or 'eager' for a residual of another width"
        )


def _gated_adapter_forward(
    x,
    w_down,
    b_down,
    w_up,
    b_up,
    residual,
    w_gate,
    b_gate,
    gate_mask,
    gate_mode,
    activation,
    scaling,
    *,
    adapter_index=None,
):
    _no_adapter_index(adapter_index, x, w_up)
    B, L, d = x.shape
    M, r = B * L, w_down.shape[0]
    mode = _gate_mode_id(w_gate, gate_mode)
    out = new_output((B, L, d), x.dtype, x.device)
    z = new_output((M, r), torch.float32, x.device)
    s = new_output((M,) if mode else (0,), torch.float32, x.device)
    extension().gated_adapter_forward(
        x,
        w_down,
        b_down,
        w_up,
        b_up,
        residual,
        w_gate,
        b_gate,
        gate_mask if mode == 2 else None,
        mode,
        ACT_ID[activation],
        float(scaling),
        out,
        z,
        s,
    )
    return out, z, s


def _gated_adapter_backward(
    grad_out,
    x,
    w_down,
    b_down,
    w_up,
    b_up,
    residual_is_x,
    w_gate,
    b_gate,
    gate_mask,
    z,
    s,
    gate_mode,
    activation,
    scaling,
    *,
    adapter_index=None,
):
    _no_adapter_index(adapter_index, x, w_up)
    dev, dt = x.device, x.dtype
    mode = _gate_mode_id(w_gate, gate_mode)
    like = lambda t: None if t is None else new_output(t.shape, dt, dev)
    dx = new_output(x.shape, dt, dev)
    dwd, dbd, dwu, dbu = like(w_down), like(b_down), like(w_up), like(b_up)
    dwg = like(w_gate)
    dbg = like(b_gate) if w_gate is not None else None
    extension().gated_adapter_backward(
        grad_out,
        x,
        w_down,
        w_up,
        b_up,
        bool(residual_is_x),
        w_gate,
        gate_mask if mode == 2 else None,
        z,
        s,
        mode,
        ACT_ID[activation],
        float(scaling),
        dx,
        dwd,
        dbd,
        dwu,
        dbu,
        dwg,
        dbg,
    )
    return dx, dwd, dbd, dwu, dbu, dwg, dbg


def _bias_only_linear_forward(x, weight, bias, activation):
    M, N = x.shape[0], weight.shape[0]
    y = new_output((M, N), x.dtype, x.device)
    pre = new_output((M, N) if activation in _NEEDS_PRE else (0,), x.dtype, x.device)
    extension().bias_only_linear_forward(x, weight, bias, ACT_ID[activation], y, pre)
    return y, pre


def _bias_only_linear_backward(grad_y, weight, saved, activation):
    dx = new_output((grad_y.shape[0], weight.shape[1]), grad_y.dtype, grad_y.device)
    dbias = new_output((weight.shape[0],), grad_y.dtype, grad_y.device)
    extension().bias_only_linear_backward(grad_y, weight, saved, ACT_ID[activation], dx, dbias)
    return dx, dbias


def _bias_only_layer_norm_forward(x, weight, bias, eps):
    M = x.shape[0]
    y = new_output(x.shape, x.dtype, x.device)
    mean = new_output((M,), torch.float32, x.device)
    rstd = new_output((M,), torch.float32, x.device)
    extension().bias_only_layer_norm_forward(x, weight, bias, float(eps), y, mean, rstd)
    return y, mean, rstd


def _bias_only_layer_norm_backward(grad_y, x, weight, mean, rstd):
    dx = new_output(x.shape, x.dtype, x.device)
    dbias = new_output(weight.shape, x.dtype, x.device)
    extension().bias_only_layer_norm_backward(grad_y, x, weight, mean, rstd, dx, dbias)
    return dx, dbias


_OPS = {
    "prefix_attention": SimpleNamespace(
        forward=_prefix_attention_forward, backward=_prefix_attention_backward
    ),
    "gated_adapter": SimpleNamespace(
        forward=_gated_adapter_forward, backward=_gated_adapter_backward
    ),
    "bias_only_linear": SimpleNamespace(
        forward=_bias_only_linear_forward, backward=_bias_only_linear_backward
    ),
    "bias_only_layer_norm": SimpleNamespace(
        forward=_bias_only_layer_norm_forward, backward=_bias_only_layer_norm_backward
    ),
}


def op_module(op: str):
    """The object exposing ``forward``/``backward`` for ``op`` (None for an unknown op).

    Cheap: the extension is loaded (or built) by the first forward/backward call.
    """
    return _OPS.get(op)
