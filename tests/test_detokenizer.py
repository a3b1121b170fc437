"""Incremental detokenization against the tokenizer's own decode of the whole output: after every
token the text equals the full decode (less a trailing incomplete character), for byte-level BPE
(GPT-2 / Llama-3 style), SentencePiece-style Metaspace BPE and the package's tiny tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from loquetier.engine.detokenizer import IncrementalText

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Grüße aus Köln, naïve café — déjà vu!",
          "東京は日本の首都です。", "emoji 😀🎉 and math ∑ x² ≤ ∞", "def f(x):\n    return x * 2  # code",
          "Numbers 12345 and 3.14159, spaces   and\ttabs."] * 20


def _byte_level() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        special_tokens=["<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _metaspace() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<eos>"] + bytes_))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def _tiny(tmp_path) -> PreTrainedTokenizerFast:
    from loquetier.tiny import build_tokenizer
    build_tokenizer(tmp_path)
    return AutoTokenizer.from_pretrained(tmp_path)


def _check(tok, ids: list[int]) -> None:
    inc = IncrementalText(tok)
    for n in range(1, len(ids) + 1):
        text = inc.update(ids, n)
        full = tok.decode(ids[:n], skip_special_tokens=True)
        assert full.startswith(text), (ids[:n], text, full)
        if not full.endswith("\ufffd"):
            assert text == full, (ids[:n], text, full)


@pytest.mark.parametrize("kind", ["byte-level", "metaspace", "tiny"])
def test_incremental_text_equals_full_decode(kind, tmp_path):
    tok = {"byte-level": _byte_level, "metaspace": _metaspace}[kind]() if kind != "tiny" else _tiny(tmp_path)
    for text in CORPUS[:6] + [" leading space", "trailing space ", "a\n\nb"]:
        _check(tok, tok.encode(text, add_special_tokens=False))
    # any token order, special tokens included (skipped in the text)
    rng = np.random.default_rng(0)
    for _ in range(20):
        _check(tok, rng.integers(0, len(tok), 40).tolist())
