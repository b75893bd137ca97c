"""Checkpoints of peft and the adapters library (AdapterHub), in and out.

:func:`from_peft` and :func:`from_adapters` read a peer's checkpoint directory onto its base
model (validated first; on any mismatch they raise :class:`InteropError` and leave the model
as it was); :func:`save_peft` writes a directory that ``peft.PeftModel.from_pretrained`` loads;
:func:`adapters_config` translates an adapters config dict alone.
Neither library needs to be installed.
"""

from ._common import InteropError
from .adapters import adapters_config, from_adapters
from .peft import from_peft, save_peft

__all__ = ["InteropError", "adapters_config", "from_adapters", "from_peft", "save_peft"]
