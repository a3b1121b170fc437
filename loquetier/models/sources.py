"""Where a base model comes from: a checkpoint directory, a Hugging Face Hub id, a GGUF file, or a
`random:` preset. `resolve_model_source` turns what the user typed into one `ModelSource`, once."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelLoadError
from .config import ModelArgs

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
# what a Hub snapshot needs for a safetensors checkpoint: never pickle weights, never every GGUF quant
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
_CONFIG_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSource:
    """A resolved base model: its format, where its files are, and its config."""

    spec: str                      # as the user gave it (a path, a Hub id, random:NAME)
    format: str                    # "safetensors" | "gguf" | "random"
    path: Path | None = None       # the checkpoint directory, or the .gguf file
    args: ModelArgs | None = None
    checkpoint_dtype: torch.dtype | None = None   # what the weights are stored as (None: float32/quantized)
    hf_config: object = field(default=None, repr=False)   # transformers' config (GGUF only)
    _tokenizer: object = field(default=None, repr=False)   # None: not read yet; False: the checkpoint has none

    def load_tokenizer(self):
        """The model's tokenizer (with its chat template), or None when the checkpoint ships none.
        Read once per source (a GGUF file's takes seconds)."""
        if self._tokenizer is None:
            self._tokenizer = self._read_tokenizer()
        return None if self._tokenizer is False else self._tokenizer

    def _read_tokenizer(self):
        if self.format == "random":
            return False
        from transformers import AutoTokenizer
        try:
            if self.format == "gguf":
                return AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
            if not any((self.path / f).exists() for f in TOKENIZER_FILES):
                return False
            return AutoTokenizer.from_pretrained(str(self.path))
        except Exception as e:   # a broken tokenizer file: say which, not a transformers traceback
            raise ModelLoadError(f"cannot read the tokenizer of {self.spec}: {type(e).__name__}: {e}") from e

    def require_tokenizer(self, what: str):
        """`load_tokenizer`, or a clear error when `what` cannot work without one."""
        tokenizer = self.load_tokenizer()
        if tokenizer is None:
            raise ModelLoadError(f"{self.spec} has no tokenizer ({', '.join(TOKENIZER_FILES)}); {what} needs one")
        return tokenizer


def resolve_model_source(spec: str | Path, revision: str | None = None) -> ModelSource:
    """Local directory or .gguf file first, then a Hub id in the Hugging Face cache (downloaded
    unless HF_HUB_OFFLINE is set); one clear `ModelLoadError` when it is none of these."""
    spec = str(spec)
    if spec.startswith("random:"):
        from .loader import preset_args
        return ModelSource(spec, "random", args=preset_args(spec))
    path = Path(spec).expanduser()
    if path.is_file():
        return _gguf_source(spec, path)
    if path.is_dir():
        if revision is not None:
            raise ModelLoadError(f"--revision names a Hub revision; {spec} is a local directory")
        return _directory_source(spec, path)
    if not _is_hub_id(spec):
        raise ModelLoadError(f"no such model: {spec!r} is not a file or directory (nor a Hugging Face Hub id)")
    return _directory_source(spec, hub_snapshot(spec, revision))


def _directory_source(spec: str, path: Path) -> ModelSource:
    config = path / "config.json"
    if config.is_file():
        cfg = json.loads(config.read_text())
        stored = cfg.get("dtype") or cfg.get("torch_dtype")   # transformers 5 writes `dtype`
        return ModelSource(spec, "safetensors", path, ModelArgs.from_hf_config(cfg), _CONFIG_DTYPES.get(stored))
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _gguf_source(spec, ggufs[0])
    if ggufs:
        raise ModelLoadError(f"{path} holds {len(ggufs)} GGUF files ({', '.join(g.name for g in ggufs)}); "
                             "pass the one to load")
    raise ModelLoadError(f"{path} has neither a config.json (a Hugging Face checkpoint) nor a .gguf file")


def _gguf_source(spec: str, path: Path) -> ModelSource:
    from .gguf import read_gguf_config
    hf_config = read_gguf_config(path)
    return ModelSource(spec, "gguf", path, ModelArgs.from_hf_config(hf_config.to_dict()), None, hf_config)


# ---------------------------------------------------------------------------------------------- the Hub
def _is_hub_id(spec: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def hub_cache_dir() -> Path:
    """The Hub cache as huggingface_hub finds it, read from the environment now (not at import):
    HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE",
                                                                                       "TRANSFORMERS_OFFLINE"))


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot directory of `repo_id` at `revision` (branch, tag or commit; default main),
    downloaded into the cache first unless the Hub is offline (`snapshot_download` semantics)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    cache, offline = hub_cache_dir(), hub_offline()
    at = f" at revision {revision!r}" if revision else ""
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=offline,
                                      allow_patterns=HUB_PATTERNS))
    except RevisionNotFoundError as e:
        raise ModelLoadError(f"the Hugging Face Hub model {repo_id!r} has no revision {revision!r}") from e
    except GatedRepoError as e:
        raise ModelLoadError(f"the Hugging Face Hub model {repo_id!r} is gated: accept its licence on the Hub "
                             "and log in (`hf auth login` or HF_TOKEN)") from e
    except RepositoryNotFoundError as e:
        raise ModelLoadError(f"no such model: {repo_id!r} is not a local path, and the Hugging Face Hub has no "
                             "such repository (or it is private: log in with `hf auth login` or HF_TOKEN)") from e
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise ModelLoadError(f"no such model: {repo_id!r} is not a local path, and the Hugging Face cache "
                             f"{cache} has no snapshot of it{at} ({why})") from e
