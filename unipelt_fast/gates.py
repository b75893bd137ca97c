"""What the gates chose: :func:`gate_report` and :func:`plot_gates`.

UniPELT's gates ``sigmoid(Linear(h))`` decide, per layer, how much each method contributes.
``gate_report(model, **batch)`` runs one forward without grad, recomputes every gate's value
from the inputs the routed calls see (``_tasks.probing``) with each task's own gate module,
and summarises it per task, layer and method over the batch's real tokens (per example for
the gates that average over the sequence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import _atomic, _tasks, reference
from .hf.placements import ADAPTER_HOSTS
from .hf.root import root_of
from .lora import GatedLoRA

METHODS = ("prefix_key", "prefix_value", "adapter", "lora", "prompt")


@dataclass(frozen=True)
class GateStat:
    """One gate's values over the batch: mean, spread (population std, min, max) and ``n``,
    the number of values (real tokens for per-token gates, examples otherwise)."""

    mean: float
    std: float
    min: float
    max: float
    n: int


@dataclass
class GateReport:
    """``stats[(task, layer, method)]``; ``layer`` is None for the soft prompt (which acts
    on the input, not on a layer). Only the tasks present in the batch appear."""

    tasks: tuple[str, ...]
    n_layers: int
    stats: dict[tuple[str, int | None, str], GateStat]

    def get(self, task: str, layer: int | None, method: str) -> GateStat | None:
        return self.stats.get((task, layer, method))

    def to_dict(self) -> dict:
        return {
            "tasks": list(self.tasks),
            "n_layers": self.n_layers,
            "stats": [
                {"task": t, "layer": layer, "method": m, **vars(s)}
                for (t, layer, m), s in self.stats.items()
            ],
        }

    def __str__(self) -> str:
        cols = [m for m in METHODS if any(k[2] == m for k in self.stats)]
        lines = []
        for task in self.tasks:
            lines.append(f"task {task!r}: gate mean ± std over real tokens / examples")
            lines.append("  layer   " + "".join(f"{c:>16}" for c in cols))
            rows = ([None] if any(k[1] is None for k in self.stats) else []) + list(
                range(self.n_layers)
            )
            for layer in rows:
                cells = []
                for c in cols:
                    s = self.get(task, layer, c)
                    cells.append(f"{'-' if s is None else f'{s.mean:.3f} ± {s.std:.3f}':>16}")
                name = "input" if layer is None else str(layer)
                lines.append(f"  {name:<8}" + "".join(cells))
        return "\n".join(lines)


def _layer_of(name: str) -> int:
    """The layer index in an HF module name (the first numeric part: encoder.layer.3...,
    transformer.h.3..., model.layers.3...)."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    raise ValueError(f"gate_report: no layer index in module name {name!r}")


def _split(task_ids: torch.Tensor | None, default_task: int, n_tasks: int):
    """(task, example rows) of each task present; rows None for the whole batch."""
    if task_ids is None or n_tasks == 1:
        yield (default_task if task_ids is None else 0), None
        return
    for t in torch.unique(task_ids).tolist():  # host reads: a diagnostic, not a hot path
        yield int(t), (task_ids == t).nonzero().squeeze(1)


def _values(g: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The gate values to summarise: per real token for a (B, L, 1) per-token gate, per
    example for a gate averaged over the sequence."""
    g = g.detach().float()
    if g.dim() == 3 and g.shape[1] > 1:  # per token
        g = g[..., 0]
        return g[mask] if mask is not None and mask.shape == g.shape else g.reshape(-1)
    return g.reshape(g.shape[0], -1)[:, 0]


def gate_report(model: nn.Module, **batch) -> GateReport:
    """Run ``model(**batch)`` once without grad (in eval mode, restored afterwards) and
    report every gate's mean and spread per task, layer and method.

    Methods: ``prefix_key`` / ``prefix_value`` (G_P; one value per example, the same for
    both unless the prefix gate is split), ``adapter`` (G_A), ``lora`` (G_L, pooled over the
    layer's LoRA targets), ``prompt`` (the soft prompt's gate). Per-token gates are
    summarised over real tokens (``attention_mask``), mean gates over examples. With
    ``task_ids`` in the batch each task is reported on its own examples.
    """
    root = root_of(model)
    tasks = root.cfg.tasks
    inner = getattr(model, "module", model)  # DDP
    found: dict[tuple[int, int | None, str], list[torch.Tensor]] = {}

    def add(task: int, layer: int | None, method: str, v: torch.Tensor) -> None:
        found.setdefault((task, layer, method), []).append(v)

    # The routed calls pass their per-task module list ("owner"); which method and layer
    # each owner is. The fused path never runs the per-task modules, so the report
    # recomputes each gate from the captured input with that task's own gate module.
    owners: dict[int, tuple[str, int | None]] = {}
    if root.prefix_gates is not None:
        for layer, per_task in enumerate(root.prefix_gates):
            owners[id(per_task)] = ("prefix", layer)
    if root.prompt is not None and root.prompt.gates is not None:
        owners[id(root.prompt.gates)] = ("prompt", None)
    for name, m in inner.named_modules():
        if isinstance(m, ADAPTER_HOSTS) and m.adapters[0].gate is not None:
            owners[id(m.adapters)] = ("adapter", _layer_of(name))
        elif isinstance(m, GatedLoRA) and m.units[0].gate is not None:
            # a LoRA outside the layers (a named target such as BERT's pooler): layer None
            has_layer = any(part.isdigit() for part in name.split("."))
            owners[id(m.units)] = ("lora", _layer_of(name) if has_layer else None)

    def probe(owner, x, task_ids, default_task, mask) -> None:
        what = owners.get(id(owner))
        if what is None:
            return
        method, layer = what
        for t, idx in _split(task_ids, default_task, len(owner)):
            xs = x if idx is None else x[idx]
            ms = mask if mask is None or idx is None else mask[idx]
            mod = owner[t]
            if method == "adapter":  # the gate lives inside the fused op: the reference's
                mode = "token" if mod.gate_mode == "token" else "mean"
                gmask = ms if mod.gate_mode == "masked_mean" else None
                w, b = mod.gate.weight, mod.gate.bias
                g = reference.adapter_gate(xs.to(w.dtype), w, b, mode, gmask)
                add(t, layer, "adapter", _values(g, ms))
            elif method == "prefix":  # PrefixGate: (B,) or (B, 2)
                v = mod(xs, ms).detach().float()
                v = v.reshape(v.shape[0], -1)
                add(t, layer, "prefix_key", v[:, 0])
                add(t, layer, "prefix_value", v[:, -1])
            else:
                gate = mod.gate if method == "lora" else mod
                add(t, layer, method, _values(gate(xs.to(gate.proj.weight.dtype), ms), ms))

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _tasks.probing(probe):
            model(**batch)
    finally:
        model.train(was_training)

    stats = {}
    for (t, layer, method), vs in sorted(
        found.items(), key=lambda kv: (kv[0][0], -1 if kv[0][1] is None else kv[0][1])
    ):
        v = torch.cat([x.reshape(-1) for x in vs])
        if v.numel() == 0:
            continue
        stats[(tasks[t], layer, method)] = GateStat(
            mean=float(v.mean()),
            std=float(v.std(correction=0)),
            min=float(v.min()),
            max=float(v.max()),
            n=int(v.numel()),
        )
    present = tuple(t for t in tasks if any(k[0] == t for k in stats))
    return GateReport(present, root.dims["n_layers"], stats)


def plot_gates(report: GateReport, path: str) -> str:
    """Write a PNG heatmap of gate means, layers x methods, one panel per task (the soft
    prompt's gate in an "input" row on top). Needs matplotlib (the ``[bench]`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            "plot_gates needs matplotlib: pip install 'unipelt-fast[bench]' "
            "(or pip install matplotlib)"
        ) from e
    if not isinstance(report, GateReport):
        raise TypeError(f"plot_gates: report must be a GateReport, got {type(report).__name__}")
    if not report.tasks:
        raise ValueError("plot_gates: the report holds no gate values (no gated method ran)")
    cols = [m for m in METHODS if any(k[2] == m for k in report.stats)]
    rows = ([None] if "prompt" in cols else []) + list(range(report.n_layers))
    fig, axes = plt.subplots(
        1,
        len(report.tasks),
        figsize=(1.3 * len(cols) * len(report.tasks) + 1.5, 0.45 * len(rows) + 1.8),
        squeeze=False,
    )
    for ax, task in zip(axes[0], report.tasks, strict=True):
        grid = [
            [math.nan if (s := report.get(task, layer, c)) is None else s.mean for c in cols]
            for layer in rows
        ]
        im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, val in enumerate(row):
                if not math.isnan(val):
                    color = "black" if val > 0.6 else "white"
                    ax.text(j, i, f"{val:.2f}", ha="center", va="center", fontsize=7, color=color)
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels(cols, rotation=30, fontsize=8)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(["input" if r is None else f"layer {r}" for r in rows], fontsize=8)
        ax.set_title(f"task {task}", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="gate mean")
    _atomic.write_with(path, lambda tmp: fig.savefig(tmp, dpi=100, bbox_inches="tight"))
    plt.close(fig)
    return path
