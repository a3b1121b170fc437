"""Load a Llama-family checkpoint (safetensors, single or sharded, or GGUF) into `LlamaModel`."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..errors import ModelLoadError
from .config import ModelArgs
from .llama import LlamaModel
from .sources import ModelSource, resolve_model_source

# HF name inside a decoder layer -> (our fused parameter, slice index within the fusion, parts)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj.base", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj.base", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj.base", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj.base", 0),
    "mlp.up_proj": ("mlp.gate_up_proj.base", 1),
    "self_attn.o_proj": ("self_attn.o_proj.base", None),
    "mlp.down_proj": ("mlp.down_proj.base", None),
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise ModelLoadError(f"{path} has only pickle weights (*.bin/*.pt); Loquetier reads safetensors only "
                                 "(convert with `transformers`: model.save_pretrained(dir, safe_serialization=True))")
        raise ModelLoadError(f"no *.safetensors weights in {path}")
    return files


def _slice_rows(args: ModelArgs, fused: str, index: int) -> tuple[int, int]:
    if fused.startswith("self_attn.qkv_proj"):
        sizes = (args.q_size, args.kv_size, args.kv_size)
    else:
        sizes = (args.intermediate_size, args.intermediate_size)
    lo = sum(sizes[:index])
    return lo, lo + sizes[index]


def load_model(source: ModelSource | str | Path, dtype: torch.dtype, device: torch.device, max_positions: int,
               lora_slots: int, lora_rank: int, lora_backend: str = "auto", tp=None) -> LlamaModel:
    """Build the model on the meta device, allocate it once on `device`, and stream the weights in
    (safetensors or a dequantized GGUF), cast to `dtype`. With `tp` (a `parallel.TensorParallel`)
    only this rank's shards: from safetensors each rank reads only those bytes."""
    if not isinstance(source, ModelSource):
        source = resolve_model_source(source)
    if source.format == "random":
        return random_model(source.args, dtype, device, max_positions, lora_slots, lora_rank, lora_backend, tp=tp)
    args = source.args if tp is None else tp.shard_args(source.args)
    with torch.device("meta"):
        model = LlamaModel(args, lora_slots, lora_rank, lora_backend, tp).to(dtype)
    model.to_empty(device=device)
    if source.format == "gguf":
        from .gguf import iter_gguf_tensors
        tensors = iter_gguf_tensors(source.path, source.hf_config)
        if tp is not None:
            tensors = ((name, tp.checkpoint_shard(name, t)) for name, t in tensors)
    else:
        tensors = _iter_safetensors(source.path, source.spec, tp)
    _copy_weights(model, args, tensors, source.spec)
    model.init_runtime(max_positions)
    return model


def _iter_safetensors(path: Path, label: str, tp=None) -> Iterator[tuple[str, torch.Tensor]]:
    files = checkpoint_files(path)
    keys = []
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            keys.append(list(f.keys()))
    with tqdm(total=sum(map(len, keys)), desc=f"Loading {label}", unit="tensor",
              dynamic_ncols=True) as bar:
        for file, names in zip(files, keys):
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in names:
                    yield name, f.get_tensor(name) if tp is None else tp.read_checkpoint_shard(f, name)
                    bar.update()


def _copy_weights(model: LlamaModel, args: ModelArgs, tensors: Iterable[tuple[str, torch.Tensor]],
                  where: str) -> None:
    """Copy HF-named tensors into the (fused) parameters; every row of every parameter must be filled."""
    params = dict(model.named_parameters())
    loaded_rows: dict[str, int] = {}
    for name, tensor in tensors:
        target, rows = _map_name(args, name)
        if target is None:
            continue
        if target not in params:
            raise ModelLoadError(f"checkpoint tensor {name} has no place in a {args.family} model")
        param = params[target]
        dst = param.data if rows is None else param.data[rows[0]:rows[1]]
        if dst.shape != tensor.shape:
            raise ModelLoadError(f"{name}: checkpoint shape {tuple(tensor.shape)} != expected {tuple(dst.shape)}")
        dst.copy_(tensor)
        loaded_rows[target] = loaded_rows.get(target, 0) + dst.shape[0]
    missing = sorted(n for n, p in params.items() if loaded_rows.get(n, 0) != p.shape[0])
    if missing:
        raise ModelLoadError(f"checkpoint {where} lacks {len(missing)} tensors, e.g. {missing[:3]}")


def _map_name(args: ModelArgs, name: str) -> tuple[str | None, tuple[int, int] | None]:
    if name == "model.embed_tokens.weight":
        return "embed_tokens.weight", None
    if name == "model.norm.weight":
        return "norm.weight", None
    if name == "lm_head.weight":
        return (None if args.tie_word_embeddings else "lm_head.weight"), None
    m = _LAYER_RE.match(name)
    if not m:
        return None, None  # e.g. rotary inv_freq buffers saved by old exports
    layer, module, kind = m.groups()
    prefix = f"layers.{layer}."
    if module in _FUSED:
        fused, index = _FUSED[module]
        if index is None:
            return f"{prefix}{fused}.{kind}", None
        return f"{prefix}{fused}.{kind}", _slice_rows(args, fused, index)
    return f"{prefix}{module}.{kind}", None


PRESETS = {
    # Llama-3-8B's shape; weights are random (benchmarks only: no download anywhere)
    "llama3-8b": dict(family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                      num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
                      max_position_embeddings=8192, eos_token_ids=[128001]),
    # Llama-3-70B's shape (tensor-parallel benchmarks: about 35 GiB of bf16 weights per GPU at size 4)
    "llama3-70b": dict(family="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
                       num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
                       max_position_embeddings=8192, eos_token_ids=[128001]),
    "tiny": dict(family="llama", vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=2048, eos_token_ids=[2]),
}


def preset_args(spec: str) -> ModelArgs:
    """`random:NAME` model specs: a preset shape with random weights."""
    name = spec.split(":", 1)[1]
    if name not in PRESETS:
        raise ModelLoadError(f"unknown random model preset {name!r}; presets: {sorted(PRESETS)}")
    return ModelArgs(**PRESETS[name])


def random_model(args: ModelArgs, dtype: torch.dtype, device: torch.device, max_positions: int,
                 lora_slots: int, lora_rank: int, lora_backend: str = "auto", seed: int = 0, tp=None) -> LlamaModel:
    """A model of `args`' shape with N(0, 0.02) weights made directly on `device` (for benchmarks;
    with `tp` this rank's shard: split weights drawn with its own seed, the embedding, drawn first,
    as rank 0 draws it, so a one-rank split is the unsplit model)."""
    if tp is not None:
        args = tp.shard_args(args)
    with torch.device("meta"):
        model = LlamaModel(args, lora_slots, lora_rank, lora_backend, tp).to(dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed if tp is None else seed + 1000 * tp.rank)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name == "embed_tokens.weight" and tp is not None and tp.rank:   # whole on every rank: the same values
                p.normal_(0.0, 0.02, generator=torch.Generator(device=device).manual_seed(seed))
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.init_runtime(max_positions)
    return model
