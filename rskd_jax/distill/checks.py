"""Checks of a distillation step's loss terms against what it trains (parameter paths only; nothing allocated).

A feature-alignment term maps student features to the teacher's width through a learned map
(`StudentWithMaps.maps`) that export discards. When none of the student parameters that produce the term's
student features is trainable, the term trains only that map: it changes nothing in the exported student, and
its gradients still count in the global-norm clip (shrinking the useful update). Such a configuration is
refused with one line naming the config key. Which student parameters a term reaches:

* ``feat_proj`` (projected image tokens): the projector, and the CLIP tower unless ``shared_vision`` (then the
  student reads the teacher's frozen vision features);
* ``feat_image`` / ``feat_text`` (LLM hidden states): the LLM below the LM head, the projector, and the CLIP
  tower unless ``shared_vision``.

E.g. ``trainable="lora"`` (adapters on the LLM only) with ``shared_vision=True``: ``feat_proj`` reaches nothing
trainable, ``feat_image`` / ``feat_text`` reach the adapters.
"""

from __future__ import annotations

from collections.abc import Iterable

FEATURE_TERMS = ("feat_image", "feat_text", "feat_proj")
# student parameter paths each named trainable subset keeps (a regex is checked when the step is built)
NAMED_SUBSETS = {
    "lora": ("model/llm/layers/q_proj/lora_a",),
    "all": ("model/llm/layers/q_proj/kernel", "model/projector/linear_1/kernel"),
    "all+vision": ("model/llm/layers/q_proj/kernel", "model/projector/linear_1/kernel", "model/vision/x"),
}


class ConfigError(ValueError):
    """A configuration the step refuses; the CLIs print its one-line message and exit with status 2."""


def reached_prefixes(term: str, shared_vision: bool) -> tuple[str, ...]:
    """'/'-joined parameter-path prefixes of a `StudentWithMaps` whose weights shape the term's student side."""
    vision = () if shared_vision else ("model/vision/",)
    if term == "feat_proj":
        return ("model/projector/", *vision)
    return ("model/llm/", "model/projector/", *vision)


def check_feature_terms(weights: dict, trainable_paths: Iterable[str], trainable: str, shared_vision: bool):
    """Raises ValueError (one line) when a weighted feature term's only trainable parameters are its map."""
    paths = list(trainable_paths)
    for term in FEATURE_TERMS:
        w = float(weights.get(term, 0.0))
        if w <= 0:
            continue
        prefixes = reached_prefixes(term, shared_vision)
        reached = [p for p in paths if p.startswith(prefixes) and not p.startswith("model/llm/lm_head/")]
        if not reached:
            own = (lambda m: m == "proj") if term == "feat_proj" else (lambda m: m.startswith("layer"))
            maps = sorted({p.split("/")[1] for p in paths if p.startswith("maps/") and own(p.split("/")[1])})
            shared = " and shared_vision=True" if shared_vision else ""
            raise ConfigError(
                f"config loss.weights.{term}={w:g}: with trainable={trainable!r}{shared}, no student parameter "
                f"this term reaches ({', '.join(p.rstrip('/') for p in prefixes)}) is trainable, so it would "
                f"only train its feature map(s) {maps}, which export discards (and its gradients would still "
                f"count in the global-norm clip); set loss.weights.{term}=0 or make those parameters trainable"
            )


def check_config(config) -> None:
    """The same rule on a distillation config, before any model is loaded, for the named trainable subsets
    (`lora`, `all`, `all+vision`); a regex subset is checked when the step is built."""
    paths = NAMED_SUBSETS.get(config.get("trainable", "all"))
    if paths is None:
        return
    weights = dict(config.loss.weights)
    maps = ["maps/proj/w"] if float(weights.get("feat_proj", 0.0)) > 0 else []
    maps += [f"maps/layer{i}/w" for i, _ in enumerate(config.loss.get("feature_layers", ()))]
    check_feature_terms(weights, [*paths, *maps], config.trainable, bool(config.get("shared_vision", False)))
