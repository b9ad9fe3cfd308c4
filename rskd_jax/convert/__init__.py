"""Weight conversion: HF Llava / original LLaVA / GeoChat / separate parts / PEFT LoRA <-> our checkpoints.

    import_checkpoint(src, dst, ...)   # -> our orbax checkpoint directory (rskd_jax/convert/ckpt.py)
    export_checkpoint(src, dst, ...)   # our checkpoint (or a training checkpoint) -> HF Llava directory
    export_model(model, cfg, dst, ...) # an in-memory LlavaModel -> HF Llava directory
    inspect_path(path)                 # format, config, parameter counts, dtypes
    statedict.params_from_state_dict   # in-memory state dicts (tests, small models), same key table

CLI: `python launch/convert.py {import,export,inspect} ...` (console script `rskd-convert`); docs/convert.md.
"""

from rskd_jax.convert.errors import ConversionError
from rskd_jax.convert.exporter import export_checkpoint, export_model
from rskd_jax.convert.importer import import_checkpoint
from rskd_jax.convert.inspection import inspect_path
from rskd_jax.convert.sources import detect_format, open_source
from rskd_jax.convert.statedict import params_from_state_dict, state_dict_from_params

__all__ = [
    "ConversionError",
    "export_checkpoint",
    "export_model",
    "import_checkpoint",
    "inspect_path",
    "detect_format",
    "open_source",
    "params_from_state_dict",
    "state_dict_from_params",
]
