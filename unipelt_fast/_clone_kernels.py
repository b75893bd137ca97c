"""Bind ``unipelt_fast.kernels`` to a clone's top-level ``kernels/`` folder.

That folder has no ``__init__.py`` on purpose. A process started in a clone has the clone on
``sys.path``, and a regular package named ``kernels`` there would shadow Hugging Face's
``kernels`` distribution, which transformers imports; Python's path finder prefers a regular
package anywhere on ``sys.path`` over a folder without one, so this folder never shadows it.

A wheel installs the folder as ``unipelt_fast/kernels/``, found as usual. In a clone (an
editable install, or ``PYTHONPATH=<clone>``) it lies beside ``unipelt_fast/``, where
setuptools' editable finder cannot resolve a folder without ``__init__.py``; this module binds
it explicitly, once, when ``unipelt_fast`` is imported.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

PACKAGE = __name__.rpartition(".")[0]


def bind() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(here, "kernels")):
        return  # installed from a wheel: the ordinary finders see it
    clone = os.path.join(os.path.dirname(here), "kernels")
    if not os.path.isfile(os.path.join(clone, "prefix_attention.py")):
        return
    spec = importlib.machinery.ModuleSpec(f"{PACKAGE}.kernels", None, is_package=True)
    spec.submodule_search_locations = [clone]
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.modules[PACKAGE].kernels = module


bind()
