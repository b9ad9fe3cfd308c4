"""Helpers shared by the configs (big_vision style: `get_config(arg)` with named presets + overrides)."""

import ml_collections


def parse_arg(arg: str | None, **defaults):
    """Parses `"preset,key=value,..."` into a ConfigDict of `defaults` updated with the given keys.

    The first bare word (no `=`) is stored as `preset`. Values are converted to the type of the default;
    an unknown key raises a KeyError naming the key and the valid ones.
    """
    out = ml_collections.ConfigDict(defaults)
    for part in filter(None, (arg or "").split(",")):
        if "=" not in part:
            if "preset" not in out:
                raise KeyError(f"config arg {part!r}: this config takes no preset")
            out.preset = part.strip()
            continue
        key, value = (s.strip() for s in part.split("=", 1))
        if key not in out:
            raise KeyError(f"config arg key {key!r} is unknown; valid keys: {sorted(out.keys())}")
        default = out[key]
        if isinstance(default, bool):
            value = value.lower() in ("1", "true", "yes", "y")
        elif default is not None:
            value = type(default)(value)
        out[key] = value
    return out
