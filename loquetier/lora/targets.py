"""Which decoder projections a PEFT LoRA config selects, matched as PEFT matches them.

PEFT matches a config against every module name of the HF model (`model.layers.0.self_attn.q_proj`,
`lm_head`, ...), in `check_target_module_exists` and `_maybe_include_all_linear_layers`:
- `exclude_modules` removes names first: a list entry removes the name equal to it or ending in
  "." + entry; a string is a regex that must match the whole name.
- `target_modules` as a string is a regex that must match the whole name ("all-linear": every
  linear layer but the output head). A list entry selects the name equal to it, or a name ending
  in "." + entry; only suffix matches are then kept to `layers_to_transform`, the layer index read
  after `layers_pattern` (any "name.N." when unset).
- A list of 20 or more entries is first condensed to the shortest suffixes that still tell the
  targets apart from every other module (`_find_minimal_target_modules`); this matters because
  full names that match exactly skip `layers_to_transform`.
Loquetier serves LoRA on the seven projections only; a config that selects any other module
(embeddings, the output head, norms, whole blocks) is refused.
"""

from __future__ import annotations

import re
from typing import Protocol

from ..errors import AdapterError
from ..models.config import LORA_TARGETS, ModelArgs

ALL_LINEAR = "all-linear"
MIN_TARGETS_TO_CONDENSE = 20   # PEFT's MIN_TARGET_MODULES_FOR_OPTIMIZATION


class TargetConfig(Protocol):
    target_modules: list[str] | str
    exclude_modules: list[str] | str | None
    layers_to_transform: list[int] | int | None
    layers_pattern: list[str] | str | None


def projection_name(layer: int, module: str) -> str:
    """The HF module name of one projection, e.g. `model.layers.3.self_attn.q_proj`."""
    return f"model.layers.{layer}.{LORA_TARGETS[module]}.{module}"


def hf_module_names(args: ModelArgs) -> list[str]:
    """Every named module of the HF model (`named_modules()`, the root left out), in its order."""
    names = ["model", "model.embed_tokens", "model.layers"]
    for i in range(args.num_layers):
        layer = f"model.layers.{i}"
        attn = [f"{layer}.self_attn"] + [projection_name(i, m) for m in LORA_TARGETS if LORA_TARGETS[m] == "self_attn"]
        if args.qk_norm:
            attn += [f"{layer}.self_attn.q_norm", f"{layer}.self_attn.k_norm"]
        mlp = [f"{layer}.mlp"] + [projection_name(i, m) for m in LORA_TARGETS if LORA_TARGETS[m] == "mlp"]
        names += [layer, *attn, *mlp, f"{layer}.mlp.act_fn", f"{layer}.input_layernorm",
                  f"{layer}.post_attention_layernorm"]
    return names + ["model.norm", "model.rotary_emb", "lm_head"]


def _projections(args: ModelArgs) -> dict[str, tuple[int, str]]:
    return {projection_name(i, m): (i, m) for i in range(args.num_layers) for m in LORA_TARGETS}


def _matches_list(entries, name: str) -> bool:
    return name in entries or any(name.endswith(f".{e}") for e in entries)


def _excluded(exclude, name: str) -> bool:
    if not exclude:
        return False
    return re.fullmatch(exclude, name) is not None if isinstance(exclude, str) else _matches_list(exclude, name)


def _layer_index(name: str, layers_pattern) -> int | None:
    # PEFT's expressions: the first numbered segment, so nested indices (experts) are not taken
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if m is not None:
                break
    return int(m.group("idx")) if m else None


def _condense(targets: set[str], names: list[str]) -> set[str]:
    """PEFT's `_find_minimal_target_modules`: the shortest suffixes that select the targets and nothing else."""
    suffixes = tuple(f".{t}" for t in targets)
    others = {n for n in ["", *names] if n not in targets and not n.endswith(suffixes)}

    def suffixes_of(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[i:]) for i in range(len(parts))][::-1]

    other_suffixes = {s for n in others for s in suffixes_of(n)}
    required: set[str] = set()
    for item, cands in sorted(((t, suffixes_of(t)) for t in targets), key=lambda kv: kv[1]):
        for s in cands:
            if s in required or s in other_suffixes:
                continue
            if not any(item.endswith(f".{r}") for r in required):
                required.add(s)
                break
    return required or targets


def _selects(cfg: TargetConfig, targets, name: str) -> bool:
    """PEFT's `check_target_module_exists` for one module name."""
    if _excluded(cfg.exclude_modules, name):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True   # an exact name skips layers_to_transform, as in PEFT
    if not any(name.endswith(f".{t}") for t in targets):
        return False
    layers = cfg.layers_to_transform
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    index = _layer_index(name, cfg.layers_pattern)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def _check_shape(cfg: TargetConfig) -> None:
    tm = cfg.target_modules
    if not tm:
        raise AdapterError("target_modules is empty: name the projections to adapt, e.g. ['q_proj', 'v_proj'] "
                           "or 'all-linear' (target_parameters adapters are not supported)")
    if not isinstance(tm, str) and not all(isinstance(t, str) and t for t in tm):
        raise AdapterError(f"target_modules must be a regex string or a list of non-empty module names, got {tm!r}")
    if isinstance(tm, str) and (cfg.layers_to_transform is not None or cfg.layers_pattern is not None):
        raise AdapterError("layers_to_transform and layers_pattern cannot be used when target_modules is a regex "
                           "string (as in PEFT)")
    if cfg.layers_pattern and cfg.layers_to_transform is None:
        raise AdapterError("layers_pattern needs layers_to_transform (as in PEFT)")
    for pattern in [p for p in [tm, cfg.exclude_modules, cfg.layers_pattern] if isinstance(p, str)]:
        try:
            re.compile(pattern)
        except re.error as e:
            raise AdapterError(f"{pattern!r} is not a valid regular expression: {e}") from None


def select_targets(cfg: TargetConfig, args: ModelArgs, strict: bool = False) -> list[tuple[int, str]]:
    """The (layer, projection) pairs `cfg` adapts in a model of shape `args`, sorted.

    AdapterError if it selects nothing, or a module that is not one of the seven projections; with
    `strict` (a new adapter), also if a list entry names no module of the model (a typo would
    otherwise train fewer modules than asked).
    """
    _check_shape(cfg)
    names = hf_module_names(args)
    projections = _projections(args)
    targets = cfg.target_modules
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        targets = set(projections)   # every nn.Linear but the output head
    elif not isinstance(targets, str):
        if strict:
            unknown = [t for t in targets if not any(_matches_list([t], n) for n in names)]
            if unknown:
                raise AdapterError(f"target module(s) {unknown} match no module of this model; choose from "
                                   f"{list(LORA_TARGETS)} (or full names such as 'model.layers.0.self_attn.q_proj'), "
                                   f"or '{ALL_LINEAR}'")
        targets = set(targets)
    if not isinstance(targets, str) and len(targets) >= MIN_TARGETS_TO_CONDENSE:
        targets = _condense(targets, names)
    selected = [n for n in names if _selects(cfg, targets, n)]
    unsupported = [n for n in selected if n not in projections]
    if unsupported:
        raise AdapterError(f"the adapter targets {unsupported[:5]}{' ...' if len(unsupported) > 5 else ''}; "
                           f"Loquetier serves LoRA on the projections {list(LORA_TARGETS)} only "
                           "(no embedding, lm_head or norm adapters)")
    if not selected:
        raise AdapterError(f"target_modules {cfg.target_modules!r} selects no projection of this model "
                           f"(after exclude_modules / layers_to_transform); choose from {list(LORA_TARGETS)}")
    return sorted(projections[n] for n in selected)
