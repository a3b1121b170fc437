"""Job checkpoints as plain files: a PEFT adapter, optimizer tensors (safetensors) and JSON state.

Written into `checkpoint-K.tmp/` and renamed to `checkpoint-K/` so a crash never leaves a half
checkpoint behind; nothing here is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..lora.adapter import AdapterWeights, save_peft_adapter

CKPT_PREFIX = "checkpoint-"

# one writer thread for the process: checkpoints reach the disk in the order they were taken, and
# the engine thread (serving) never waits for it; the interpreter joins it at exit
_WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loquetier-checkpoints")


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return out_dir / f"{CKPT_PREFIX}{step}"


def save_checkpoint_later(out_dir: Path, step: int, weights: AdapterWeights, optimizer_state: dict,
                          state: dict, base_model: str) -> Future:
    """`save_checkpoint` on the writer thread. Every tensor must be a host copy of its own, which
    nothing changes while it is written (see `host_copy`)."""
    return _WRITER.submit(save_checkpoint, out_dir, step, weights, optimizer_state, state, base_model)


def host_copy(optimizer_state: dict) -> dict:
    """An optimizer `state_dict()` with every tensor copied to the CPU (the live state changes at
    the next optimizer step)."""
    return {"state": {idx: {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v
                            for k, v in st.items()} for idx, st in optimizer_state["state"].items()},
            "param_groups": optimizer_state["param_groups"]}


def save_checkpoint(out_dir: Path, step: int, weights: AdapterWeights, optimizer_state: dict,
                    state: dict, base_model: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(out_dir, step)
    tmp = out_dir / f"{CKPT_PREFIX}{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_peft_adapter(weights, tmp, base_model)
    tensors, groups = {}, optimizer_state["param_groups"]
    for idx, st in optimizer_state["state"].items():
        for key, value in st.items():
            tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
    for key, value in state.pop("tensors", {}).items():
        tensors[key] = value.detach().cpu().contiguous()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps({**state, "param_groups": groups}, indent=1))
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(out_dir)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint (temp directories of an interrupted save are ignored)."""
    if not out_dir.is_dir():
        return None
    steps = [(int(p.name[len(CKPT_PREFIX):]), p) for p in out_dir.iterdir()
             if p.is_dir() and p.name.startswith(CKPT_PREFIX) and p.name[len(CKPT_PREFIX):].isdigit()
             and (p / "trainer_state.json").is_file()]
    return max(steps)[1] if steps else None


def load_checkpoint_state(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(trainer_state json, flat tensors) of a checkpoint directory."""
    state = json.loads((path / "trainer_state.json").read_text())
    return state, load_file(str(path / "optimizer.safetensors"))


def optimizer_state_from(state: dict, tensors: dict[str, torch.Tensor]) -> dict:
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            per_param.setdefault(int(idx), {})[name] = value
    return {"state": per_param, "param_groups": state["param_groups"]}
