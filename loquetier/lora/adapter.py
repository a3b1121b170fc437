"""LoRA adapters on disk in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`)."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import AdapterError
from ..models.config import ModelArgs
from .targets import ALL_LINEAR, projection_name, select_targets

# a LoRA tensor of PEFT's file: base_model.model.<module name>.lora_A|B[.<adapter name>].weight
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<kind>[AB])(?:\.[\w-]+)?\.weight$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
# LoraConfig fields that change what the adapter computes and that Loquetier does not implement
_UNSUPPORTED_VARIANTS = ("lora_bias", "alora_invocation_tokens", "use_qalora", "layer_replication",
                         "trainable_token_indices", "target_parameters", "use_bdlora", "velora_config", "kasa_config",
                         "arrow_config", "monteclora_config", "megatron_config")


@dataclass
class LoraSpec:
    """An adapter's hyperparameters, as in PEFT's LoraConfig."""

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        if self.target_modules == [ALL_LINEAR]:   # the API's list spelling of PEFT's "all-linear"
            self.target_modules = ALL_LINEAR

    def modules(self, args: ModelArgs, strict: bool = False) -> list[tuple[int, str]]:
        """The (layer, projection) pairs this spec adapts, matched as PEFT does (`lora/targets.py`);
        `strict` also refuses list entries that name no module of the model."""
        return select_targets(self, args, strict)

    def scale_for(self, module_key: str, rank: int) -> float:
        alpha = _pattern_value(self.alpha_pattern, module_key, self.lora_alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def rank_for(self, module_key: str) -> int:
        return _pattern_value(self.rank_pattern, module_key, self.r)


def _pattern_value(patterns: dict, key: str, default):
    for pat, value in patterns.items():
        if re.match(rf"(.*\.)?({pat})$", key):
            return value
    return default


@dataclass
class AdapterWeights:
    """One adapter's tensors on the CPU: (layer, module) -> (A [r, d_in], B [d_out, r]).

    `flat`, when set (`packed()`): one buffer that every tensor is a view of, A then B of each module
    in `modules` order, so the adapter reaches the device in one copy with nothing to gather first."""

    spec: LoraSpec
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    flat: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def tensors(self) -> list[torch.Tensor]:
        """A then B of each module, in `modules` order (the layout of `flat`)."""
        return [t for pair in self.modules.values() for t in pair]

    def packed(self) -> AdapterWeights:
        """These weights as views of one flat CPU buffer (the same weights if they are not all CPU
        tensors of one dtype)."""
        tensors = self.tensors()
        if not tensors or any(t.device.type != "cpu" or t.dtype != tensors[0].dtype for t in tensors):
            return self
        flat = torch.cat([t.reshape(-1) for t in tensors])
        views = flat_views(flat, tensors)
        return AdapterWeights(self.spec, dict(zip(self.modules, zip(views[0::2], views[1::2]))), flat)

    def tensors_on(self, device: torch.device) -> list[torch.Tensor]:
        """`tensors()` on `device`: packed weights through one host-to-device copy of `flat`, each a
        view of it (a rank-16 all-linear adapter of an 8B model is 448 small tensors, and as many
        copies cost far more than one of their total size); unpacked ones, or on the CPU, as they are."""
        tensors = self.tensors()
        if self.flat is None or device.type == "cpu":
            return tensors
        return flat_views(self.flat.to(device), tensors)

    def scale(self, layer: int, module: str) -> float:
        a, _ = self.modules[(layer, module)]
        return self.spec.scale_for(projection_name(layer, module), a.shape[0])

    @property
    def max_rank(self) -> int:
        return max((a.shape[0] for a, _ in self.modules.values()), default=0)


def flat_views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive views of `flat` shaped like the tensors of `like`."""
    return [v.view(t.shape) for v, t in zip(flat.split([t.numel() for t in like]), like)]


def module_shapes(args: ModelArgs, module: str) -> tuple[int, int]:
    """(d_in, d_out) of a target module."""
    h, i = args.hidden_size, args.intermediate_size
    return {"q_proj": (h, args.q_size), "k_proj": (h, args.kv_size), "v_proj": (h, args.kv_size),
            "o_proj": (args.q_size, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}[module]


def load_peft_adapter(path: str | Path, args: ModelArgs, max_rank: int) -> AdapterWeights:
    """Read and validate a PEFT LoRA adapter directory. Raises AdapterError with the reason."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter path {str(path)!r} does not exist or is not a directory")
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise AdapterError(f"{path} has no adapter_config.json (expected a PEFT LoRA adapter directory)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_file} is not valid JSON: {e}") from None
    weights_file = path / "adapter_model.safetensors"
    if not weights_file.is_file():
        if (path / "adapter_model.bin").exists():
            raise AdapterError(f"{path} holds only adapter_model.bin (pickle), which Loquetier never loads; "
                               "re-save it with PEFT's save_pretrained(..., safe_serialization=True)")
        raise AdapterError(f"{path} has no adapter_model.safetensors")
    spec = _spec_from_config(cfg, path)
    try:
        targets = spec.modules(args)
    except AdapterError as e:
        raise AdapterError(f"{cfg_file}: {e}") from None
    projections = {projection_name(layer, module): (layer, module) for layer, module in targets}
    raw: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights_file), framework="pt", device="cpu") as f:
            for key in f.keys():
                m = _KEY_RE.match(key)
                if not m:
                    raise AdapterError(f"{weights_file}: tensor {key!r} is not a LoRA weight of a decoder "
                                       "projection (embedding/lm_head adapters and modules_to_save are not supported)")
                name = m.group("module")
                if name not in projections:
                    raise AdapterError(_stray_tensor_message(weights_file, key, name, args))
                raw.setdefault(projections[name], {})[m.group("kind")] = f.get_tensor(key)
    except AdapterError:
        raise
    except Exception as e:  # corrupt header, truncated file...
        raise AdapterError(f"cannot read {weights_file}: {e}") from None
    missing = [projection_name(layer, module) for layer, module in targets if (layer, module) not in raw]
    if missing:
        raise AdapterError(f"{weights_file} has no weights for {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
                           f"which {cfg_file.name} targets; was the file cut short or the config edited?")
    modules = {}
    for (layer, module), ab in sorted(raw.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{weights_file}: layer {layer} {module} lacks lora_{'A' if 'A' not in ab else 'B'}")
        a, b = ab["A"], ab["B"]
        d_in, d_out = module_shapes(args, module)
        r = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != d_in or b.shape != (d_out, r):
            raise AdapterError(f"{weights_file}: layer {layer} {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                               f"which do not fit the base model (expected A [r, {d_in}], B [{d_out}, r]); "
                               "was it trained on another base model?")
        if r > max_rank:
            raise AdapterError(f"adapter rank {r} (layer {layer} {module}) exceeds max_lora_rank={max_rank}; "
                               "restart with a larger --max-lora-rank")
        modules[(layer, module)] = (a.float(), b.float())
    return AdapterWeights(spec, modules)


def _stray_tensor_message(weights_file: Path, key: str, name: str, args: ModelArgs) -> str:
    layer = _LAYER_RE.match(name)
    if layer and int(layer.group(1)) >= args.num_layers:
        return f"{weights_file}: tensor {key!r} is for layer {layer.group(1)} but the base model has {args.num_layers} layers"
    return (f"{weights_file}: tensor {key!r} is for {name!r}, which the adapter's target_modules / exclude_modules / "
            "layers_to_transform do not select (or which is not one of this model's projections)")


def _spec_from_config(cfg: dict, path: Path) -> LoraSpec:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LoRA")
    if cfg.get("use_dora"):
        raise AdapterError(f"{path}: DoRA adapters are not supported")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"{path}: modules_to_save {cfg['modules_to_save']} is not supported (LoRA weights only)")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias={cfg['bias']!r} is not supported (only 'none')")
    if cfg.get("fan_in_fan_out"):
        raise AdapterError(f"{path}: fan_in_fan_out adapters are not supported")
    variants = [k for k in _UNSUPPORTED_VARIANTS if cfg.get(k)]
    if variants:
        raise AdapterError(f"{path}: LoRA variant option(s) {variants} are not supported (plain LoRA only)")

    def listed(value):
        return value if value is None or isinstance(value, (str, int)) else list(value)
    return LoraSpec(r=int(cfg.get("r", 8)), lora_alpha=float(cfg.get("lora_alpha", 8)),
                    lora_dropout=float(cfg.get("lora_dropout", 0.0) or 0.0),
                    target_modules=listed(cfg.get("target_modules")) or [],
                    use_rslora=bool(cfg.get("use_rslora", False)),
                    init_lora_weights=cfg.get("init_lora_weights", True),
                    rank_pattern=cfg.get("rank_pattern") or {}, alpha_pattern=cfg.get("alpha_pattern") or {},
                    exclude_modules=listed(cfg.get("exclude_modules")),
                    layers_to_transform=listed(cfg.get("layers_to_transform")),
                    layers_pattern=listed(cfg.get("layers_pattern")))


def new_adapter(spec: LoraSpec, args: ModelArgs, max_rank: int, seed: int = 0) -> AdapterWeights:
    """A fresh trainable adapter with PEFT's initialisation: A random, B zero."""
    if spec.init_lora_weights not in (True, "gaussian"):
        raise AdapterError(f"init_lora_weights={spec.init_lora_weights!r} is not supported (True or 'gaussian')")
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for layer, module in spec.modules(args, strict=True):
        r = spec.rank_for(projection_name(layer, module))
        if r > max_rank:
            raise AdapterError(f"rank {r} exceeds max_lora_rank={max_rank}")
        d_in, d_out = module_shapes(args, module)
        a = torch.empty(r, d_in)
        if spec.init_lora_weights == "gaussian":
            a.normal_(0.0, 1.0 / r, generator=gen)
        else:  # nn.Linear's default, as PEFT: kaiming_uniform_(a=sqrt(5)) => U(-1/sqrt(d_in), 1/sqrt(d_in))
            bound = 1.0 / math.sqrt(d_in)
            a.uniform_(-bound, bound, generator=gen)
        modules[(layer, module)] = (a, torch.zeros(d_out, r))
    return AdapterWeights(spec, modules)


def save_peft_adapter(weights: AdapterWeights, path: str | Path, base_model: str = "",
                      dtype: torch.dtype = torch.float32) -> None:
    """Write a directory PEFT's `PeftModel.from_pretrained` loads; each file lands atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    spec = weights.spec
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
           "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
           "layers_to_transform": None, "layers_pattern": None, "use_dora": False, "revision": None}
    cfg.update(asdict(spec))   # the selection fields as given: PEFT selects the same modules again
    tensors = {}
    for (layer, module), (a, b) in weights.modules.items():
        prefix = f"base_model.model.{projection_name(layer, module)}"
        tensors[f"{prefix}.lora_A.weight"] = a.detach().to("cpu", dtype).contiguous()
        tensors[f"{prefix}.lora_B.weight"] = b.detach().to("cpu", dtype).contiguous()
    tmp = path / f".adapter_model.safetensors.tmp{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path / "adapter_model.safetensors")
    tmp = path / f".adapter_config.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(cfg, indent=2))
    os.replace(tmp, path / "adapter_config.json")
