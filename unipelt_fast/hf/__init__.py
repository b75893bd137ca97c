"""UniPELT for Hugging Face models: :func:`apply_unipelt`, :func:`eject`, :func:`trainable_report`.

How it hooks in -- the model layout, one injector per method, the Site records and the
per-forward state on the :class:`UniPELTRoot`, masks, tasks -- is in ``docs/hf.md``.

Layout: ``apply.py`` (apply_unipelt), ``layout.py`` (the model description) built by
``families.py`` / ``encdec.py``, ``inject.py`` (one injector per method), ``snapshot.py``
(undo of a failed apply), ``root.py`` (the root, Sites, per-forward state), ``hooks.py``,
``attention.py`` (the registered attention function), ``masks.py``, ``wrappers.py`` /
``placements.py`` (adapter wrappers), ``report.py`` (tasks, eject, trainable_report).
"""

from .apply import apply_unipelt
from .attention import ATTN_NAME, unipelt_attention
from .families import model_dims, model_layout
from .masks import convert_mask
from .report import eject, set_active_task, trainable_report
from .root import Site, UniPELTRoot, root_of
from .snapshot import Snapshot
from .wrappers import AdapterWrapper

__all__ = [
    "ATTN_NAME",
    "AdapterWrapper",
    "Site",
    "Snapshot",
    "UniPELTRoot",
    "apply_unipelt",
    "convert_mask",
    "eject",
    "model_dims",
    "model_layout",
    "root_of",
    "set_active_task",
    "trainable_report",
    "unipelt_attention",
]
