import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels run through the interpreter; set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    from helpers import write_checkpoint
    path = tmp_path_factory.mktemp("llama")
    write_checkpoint(path, "llama")
    return path


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every float buffer the kernels allocate starts as NaN: an element they fail to write shows."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


@pytest.fixture(scope="session")
def api_server(tmp_path_factory):
    """One `loquetier serve` subprocess for the API tests (starting one costs ~25 s on 2 cores),
    with an LLM over the same checkpoint as the reference; yields (root, server, llm)."""
    from helpers import API_KEY, MAX_WAITING, UPLOAD_LIMIT, Server, write_adapter, write_model_with_tokenizer

    from loquetier import LLM
    from loquetier.tiny import arithmetic_examples, write_jsonl
    root = tmp_path_factory.mktemp("api")
    hf = write_model_with_tokenizer(root / "model", "llama")
    write_adapter(hf, root / "adapters" / "a1", 8, ["q_proj", "v_proj", "down_proj"], seed=1)
    write_adapter(hf, root / "adapters" / "a2", 4, ["o_proj", "up_proj"], seed=2)
    write_adapter(hf, root / "outside" / "a3", 4, ["q_proj"], seed=3)
    examples = arithmetic_examples(20, seed=1, max_operand=30)
    write_jsonl(examples[:16], root / "train.jsonl")
    write_jsonl(examples[16:], root / "valid.jsonl")
    server = Server(root / "model", root / "data", root / "server.log", "--adapter", f"a1={root / 'adapters' / 'a1'}",
                    "--api-key", API_KEY, "--enable-lora-loading", "--lora-root", str(root / "adapters"),
                    "--max-upload-bytes", str(UPLOAD_LIMIT), "--max-waiting", str(MAX_WAITING),
                    "--checkpoint-interval", "2", "--base-learning-rate", "1e-3")
    llm = LLM(str(root / "model"), max_lora_rank=16, num_kv_blocks=256)
    llm.load_adapter("a1", root / "adapters" / "a1")
    llm.load_adapter("a2", root / "adapters" / "a2")
    try:
        yield root, server, llm
    finally:
        server.stop()
