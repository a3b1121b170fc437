"""An offline tiny tokenizer and a tiny task, for tests and `loquetier demo`.

Nothing here touches the network: the tokenizer is a small byte-level BPE trained in-process on
a built-in corpus, and the task is generated from a seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
END_TOKEN = "<|end|>"
# Order fixes the ids: <pad>=0, <s>=1, </s>=2, then the chat tokens 3..6.
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN]
# A generator must stop at either: `</s>` ends plain completions, `<|end|>` ends chat turns.
STOP_TOKENS = [EOS_TOKEN, END_TOKEN]

VOCAB_SIZE = 384  # 7 special + 256 bytes + ~120 merges; well under the 512 the tests rely on
MODEL_MAX_LENGTH = 2048

# `<|role|>content<|end|>` per message; the assistant's content and its `<|end|>` sit inside
# `{% generation %}` so transformers can return an assistant-token mask from the template.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|assistant|>' }}"
    "{%- generation %}{{- message['content'] + '<|end|>' }}{%- endgeneration %}"
    "{%- else %}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}"
)

# Enough English for BPE to learn a few common merges; digits are never merged (see below).
_CORPUS = """
The quick brown fox jumps over the lazy dog. What is the answer? The answer is yes.
You are a helpful assistant. Please answer the question and explain your answer.
Hello, how are you today? I am fine, thank you. Tell me a story about a cat and a dog.
Below is an instruction that describes a task. Write a response that appropriately
completes the request. ### Instruction: ### Input: ### Response:
def main(): return x + y  # add two numbers, then print the result
"""


def _corpus() -> list[str]:
    """The training corpus: the built-in text, repeated so its merges clear min_frequency,
    plus every printable ASCII character once."""
    printable = "".join(chr(c) for c in range(32, 127))
    return _CORPUS.strip().splitlines() * 4 + [printable, "0123456789 + - = \t\n"]


def _train_tokenizer() -> Tokenizer:
    """Byte-level BPE: any text round-trips (no unknown token), and each digit is its own token
    so arithmetic stays learnable by a tiny model."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    # Like Llama: `tokenizer(text)` prepends <s>; apply_chat_template gets <s> from the template.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tokenizer


def build_tokenizer(out_dir: str | Path) -> None:
    """Write a tiny HF tokenizer (tokenizer.json, tokenizer_config.json, special_tokens_map.json)
    into out_dir; `AutoTokenizer.from_pretrained(out_dir)` loads it with bos/eos/pad and a chat template."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _train_tokenizer().save(str(out / "tokenizer.json"))
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": MODEL_MAX_LENGTH,
        # Otherwise decode may rewrite " ," as "," and break round trips.
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def arithmetic_examples(n: int, seed: int, max_operand: int = 50) -> list[dict]:
    """n distinct addition problems `{"prompt": "12+7=", "completion": "19"}` with operands in
    [0, max_operand], drawn without replacement from a seeded RNG (same n and seed, same list).

    Measured: a 2-layer, hidden-128 Llama trained from scratch (AdamW lr 1e-3, batch 64) on 2,000
    of these gets ~95% of held-out sums right after ~1,700 steps, 2.5 minutes on 2 CPU threads
    (lr 3e-3 stalls). max_operand=9 (all 100 single-digit sums) is learned by hidden 64 in 30 s.
    """
    space = (max_operand + 1) ** 2
    if not 0 <= n <= space:
        raise ValueError(f"n={n} must be between 0 and {space}, the number of distinct problems "
                         f"with max_operand={max_operand}")
    pairs = random.Random(seed).sample(range(space), n)
    examples = []
    for pair in pairs:
        a, b = divmod(pair, max_operand + 1)
        examples.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
    return examples


def arithmetic_split(
    n_train: int, n_eval: int, seed: int, max_operand: int = 50
) -> tuple[list[dict], list[dict]]:
    """Disjoint (train, held-out) addition problems: no held-out prompt appears in train."""
    examples = arithmetic_examples(n_train + n_eval, seed, max_operand)
    return examples[:n_train], examples[n_train:]


def write_jsonl(examples: list[dict], path: str | Path) -> None:
    """Write examples one JSON object per line, the format `loquetier finetune` reads."""
    lines = (json.dumps(example) + "\n" for example in examples)
    Path(path).write_text("".join(lines))
