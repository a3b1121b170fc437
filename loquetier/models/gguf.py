"""GGUF checkpoints (llama.cpp's single-file format), read through transformers' GGUF support and the
`gguf` package: the config and tokenizer come from the file's metadata, the weights are dequantized
one tensor at a time (never the whole model at once) and named as transformers names them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ModelLoadError
from .config import SUPPORTED_ARCHITECTURES


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ModelLoadError("reading GGUF files needs the `gguf` package: pip install gguf") from e


def read_gguf_config(path: Path):
    """transformers' config for the model in a GGUF file (its metadata, under transformers' names)."""
    _require_gguf()
    from transformers import AutoConfig
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"{path} is not a GGUF file (pass a .gguf file or a checkpoint directory)")
    try:
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, NotImplementedError) as e:
        # transformers names the architecture it cannot read; we add the ones we can run
        raise ModelLoadError(f"cannot read the GGUF file {path}: {e}; Loquetier runs "
                             f"{sorted(SUPPORTED_ARCHITECTURES)}") from e


def iter_gguf_tensors(path: Path, hf_config) -> Iterator[tuple[str, torch.Tensor]]:
    """`(transformers name, float32 tensor)` for every weight in the file, dequantized one at a time."""
    _require_gguf()
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, read_field
    reader = GGUFReader(str(path))
    architecture = read_field(reader, "general.architecture")[0]
    config = hf_config.to_dict()
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config)
    names = _gguf_to_hf_names(architecture, hf_config)
    parsed = {"config": config, "tensors": {}}
    for tensor in tqdm(reader.tensors, desc=f"Loading {path.name}", unit="tensor", dynamic_ncols=True):
        # llama.cpp permutes q/k rows for its rotary layout; the processor undoes that
        result = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                   tensor_key_mapping=names, parsed_parameters=parsed)
        if result.name in names:
            yield names[result.name], torch.from_numpy(np.array(result.weights, dtype=np.float32))


def _gguf_to_hf_names(architecture: str, hf_config) -> dict[str, str]:
    """`{gguf tensor name: transformers parameter name}` from gguf's table for the architecture.
    (transformers' own `get_gguf_hf_weights_map` rebuilds that table once per submodule: seconds.)"""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
    from transformers import AutoModelForCausalLM
    arch = next((key for key, value in MODEL_ARCH_NAMES.items() if value == architecture), None)
    if arch is None:
        raise ModelLoadError(f"the gguf package does not know the GGUF architecture {architecture!r}")
    name_map = get_tensor_name_map(arch, hf_config.num_hidden_layers)
    with torch.device("meta"):   # only its parameter names are needed
        hf_names = list(AutoModelForCausalLM.from_config(hf_config).state_dict())
    names = {}
    for hf_name in hf_names:
        stem, _, suffix = hf_name.rpartition(".")
        gguf_name = name_map.get_name(stem)
        if gguf_name is not None:
            names[f"{gguf_name}.{suffix}"] = hf_name
    return names
