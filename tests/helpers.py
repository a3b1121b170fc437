"""Tiny random-weight HF checkpoints and PEFT adapters for the tests (written with transformers/peft)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

FAMILIES = ("llama", "llama3", "mistral", "qwen2", "qwen3")


def hf_config(family: str, **overrides):
    import transformers as tf
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        cfg = tf.LlamaConfig(**{**common, **overrides})
    elif family == "llama3":  # Llama 3.1 rope scaling
        cfg = tf.LlamaConfig(**{**common, "rope_theta": 500000.0,
                                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                **overrides})
    elif family == "mistral":
        cfg = tf.MistralConfig(**{**common, "sliding_window": None, **overrides})
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**{**common, "tie_word_embeddings": True, **overrides})
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**{**common, "head_dim": 32, **overrides})
    else:
        raise ValueError(family)
    return cfg


def write_checkpoint(path: Path, family: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    """Save a random tiny model of `family` to `path` (safetensors) and return the HF model (eval mode)."""
    import transformers as tf
    torch.manual_seed(seed)
    cfg = hf_config(family, **overrides)
    model = tf.AutoModelForCausalLM.from_config(cfg).to(dtype)
    # random biases too, so q/k/v bias handling is really exercised
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return model.eval()


def write_adapter(base_model, path: Path, r: int, targets, alpha: float = 16, seed: int = 0,
                  use_rslora: bool = False, **kw):
    """Make a PEFT LoRA adapter with random (non-zero) A and B, save it, and return the PeftModel."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets if isinstance(targets, str) else list(targets),
                     lora_dropout=0.0,
                     use_rslora=use_rslora, task_type="CAUSAL_LM", **kw)
    import copy
    peft_model = get_peft_model(copy.deepcopy(base_model), cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    peft_model.save_pretrained(path)
    return peft_model.eval()


def forward_all(engine, prompts, adapters):
    """Prefill every prompt in ONE mixed batch through `engine` and return each prompt's logits
    at every position ([len, vocab] each). Blocks are taken from and returned to the pool."""
    from loquetier.engine.batch import ScheduledSeq, build_mixed_batch
    from loquetier.engine.sequence import Sequence
    from loquetier.sampling_params import SamplingParams
    seqs = [Sequence(list(p), SamplingParams(max_tokens=1), a) for p, a in zip(prompts, adapters)]
    for s in seqs:
        s.block_table = engine.kv.allocator.allocate(engine.kv.blocks_needed(len(s.prompt_token_ids)))
    names = {a for a in adapters if a}
    slot_of = {None: -1, **engine.adapters.activate(names)}
    batch = build_mixed_batch([], [ScheduledSeq(s, 0, len(s.prompt_token_ids)) for s in seqs], slot_of,
                              engine.kv.block_size, engine.device)
    with torch.no_grad():
        hidden = engine.model(batch.input_ids, batch.ctx)
        logits = engine.model.compute_logits(hidden)
    out, start = {}, 0
    for sch in batch.scheduled:   # the builder may reorder (prefill before decode)
        out[id(sch.seq)] = logits[start:start + sch.length]
        start += sch.length
    for s in seqs:
        engine.kv.allocator.release(s.block_table)
    return [out[id(s)].cpu() for s in seqs]


def write_model_with_tokenizer(path: Path, family: str = "llama", seed: int = 0, **overrides):
    """A tiny checkpoint plus the package's offline tokenizer in the same directory."""
    from loquetier.tiny import VOCAB_SIZE, build_tokenizer
    hf = write_checkpoint(path, family, seed, vocab_size=VOCAB_SIZE, pad_token_id=0, **overrides)
    build_tokenizer(path)
    return hf


def write_prompt_completion(path: Path, n: int, seed: int = 0) -> Path:
    from loquetier.tiny import arithmetic_examples, write_jsonl
    write_jsonl(arithmetic_examples(n, seed, max_operand=30), path)
    return path


# Triton kernel tests: compiled on a GPU; on a CPU-only machine conftest.py has set
# TRITON_INTERPRET=1 and the kernels run interpreted (the GPU-only bf16 tests are skipped)
ON_GPU = os.environ.get("TRITON_INTERPRET", "0") != "1" and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs CUDA (and TRITON_INTERPRET unset)")


# ------------------------------------------------------------------------ a real server for API tests
API_KEY = "sk-test-key"
BASE = "tiny"
MAX_WAITING = 100
UPLOAD_LIMIT = 100_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m loquetier.cli serve ...` in a subprocess, on a free loopback port."""

    def __init__(self, model: Path, data_dir: Path, log: Path, *extra: str,
                 launcher: tuple[str, ...] = ("-m", "loquetier.cli")):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, *launcher, "serve", str(model), "--served-model-name", BASE,
               "--port", str(self.port), "--data-dir", str(data_dir), "--num-kv-blocks", "256",
               "--max-lora-rank", "16", "--log-level", "warning", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"server did not start:\n{self.tail()}")
            time.sleep(0.2)

    def tail(self) -> str:
        return self.log.read_text()[-3000:]

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def client(self, key: str | None = API_KEY, **kw):
        import openai   # here, so that tests without a server run where the client is not installed
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0, timeout=60, **kw)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def assert_error(resp: httpx.Response, status: int, *words: str) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    for word in words:
        assert word in err["message"], err["message"]
    return err


def post(server, path, auth=API_KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {auth}"} if auth else {}
    return httpx.post(f"{server.url}{path}", headers=headers, timeout=60, **kw)
def write_hub_snapshot(hf_home: Path, repo_id: str, source_dir: Path, commit: str,
                       refs: tuple[str, ...] = ("main",)) -> Path:
    """Lay `source_dir`'s files out as huggingface_hub's cache does: blobs/, snapshots/<commit>/
    (links to the blobs) and refs/<branch> holding the commit. Returns the snapshot directory."""
    import hashlib
    import shutil
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(source_dir.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)   # no newline, as huggingface_hub writes it
    return snapshot


def _llama_cpp_permute(w, n_head: int):
    """llama.cpp's conversion reorders q/k rows from HF's rotate-half layout to interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, hf_model, tokenizer_dir: Path, quantize: bool = True) -> Path:
    """Convert a tiny HF Llama and its byte-level BPE tokenizer to a GGUF file the way llama.cpp's
    converter does (q/k permuted, llama.cpp tensor names), its 2-D weights Q8_0-quantized."""
    import json

    import gguf
    import numpy as np
    cfg = hf_model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny test llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["content"] for t in tok["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t, _ in vocab])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_pad_token_id(cfg.pad_token_id)
    writer.add_chat_template(tok_cfg["chat_template"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in hf_model.state_dict().items():
        stem, _, suffix = name.rpartition(".")
        array = tensor.float().numpy()
        if stem.endswith("q_proj"):
            array = _llama_cpp_permute(array, cfg.num_attention_heads)
        elif stem.endswith("k_proj"):
            array = _llama_cpp_permute(array, cfg.num_key_value_heads)
        gguf_name = f"{names.get_name(stem)}.{suffix}"
        if quantize and array.ndim == 2:
            q = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
