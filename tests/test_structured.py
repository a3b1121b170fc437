"""Structured outputs: generations under a JSON schema, batched with adapters, equal a greedy loop
over HF/PEFT logits masked by llguidance's own reference code, and parse and validate."""

import json
from typing import Annotated, Literal

import llguidance
import llguidance.hf
import llguidance.numpy as llnp
import numpy as np
import pytest
import torch
from helpers import write_adapter, write_model_with_tokenizer
from pydantic import BaseModel, ConfigDict, Field

from loquetier import LLM, SamplingParams, StructuredOutputsParams
from loquetier.engine.structured import JSON_OPTIONS, Grammar, TokenBitmask
from loquetier.errors import RequestError

EOS = 2


class Pet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["cat", "dog", "fish"]
    age: Annotated[int, Field(ge=0, le=20)]
    indoor: bool


class Order(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: Literal["S", "M", "L"]
    count: Annotated[int, Field(ge=1, le=9)]
    extras: Annotated[list[Literal["milk", "sugar"]], Field(max_length=2)]


def json_params(schema: dict | None, **kw) -> SamplingParams:
    so = StructuredOutputsParams(json=schema) if schema is not None else None
    return SamplingParams(**{"max_tokens": 48, "temperature": 0, "structured_outputs": so, **kw})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("structured")
    hf = write_model_with_tokenizer(root / "base", "llama")
    peft = [write_adapter(hf, root / f"a{i}", 4 + 4 * i, targets, seed=i)
            for i, targets in enumerate([["q_proj", "v_proj"], ["o_proj", "down_proj", "gate_proj"]])]
    return root, {None: hf, "a0": peft[0], "a1": peft[1]}


def reference_greedy(model, tokenizer, prompt: list[int], schema: dict, max_tokens: int) -> list[int]:
    """Greedy decoding over the model's logits with llguidance's numpy mask, token by token."""
    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=model.config.vocab_size, eos_token=[EOS])
    matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS))
    ids, out = list(prompt), []
    for _ in range(max_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1:].float().numpy().copy()
        mask = llnp.allocate_token_bitmask(1, logits.shape[1])
        llnp.fill_next_token_bitmask(matcher, mask)
        llnp.apply_token_bitmask_inplace(logits, mask)
        token = int(logits.argmax())
        out.append(token)
        ids.append(token)
        assert matcher.consume_token(token)
        if token == EOS or matcher.is_stopped():
            break
    return out


def test_schemas_and_adapters_in_one_batch_equal_reference(models):
    root, ref_models = models
    schemas = [Pet.model_json_schema(), Order.model_json_schema(), Pet.model_json_schema(), None]
    adapters = ["a0", "a1", None, "a0"]
    results = {}
    for mode in (True, False):
        llm = LLM(str(root / "base"), max_lora_rank=8, num_kv_blocks=256, async_scheduling=mode)
        llm.load_adapter("a0", root / "a0")
        llm.load_adapter("a1", root / "a1")
        prompts = [llm.encode(p) for p in ["A pet:", "Order:", "Hello", "Hello"]]
        rows = []
        llm.engine.step_observers.append(lambda info: rows.append(info["num_decode_tokens"]))
        params = [json_params(s) for s in schemas[:3]] + [json_params(None, max_tokens=8, ignore_eos=True)]
        outs = llm.generate(prompts, params, adapters)
        assert max(rows) == 4     # the four requests decoded side by side
        results[mode] = [o.token_ids for o in outs]
        for o, model in zip(outs[:3], (Pet, Order, Pet)):
            assert o.finish_reason == "stop"
            model.model_validate_json(o.text)                    # parses and validates
            assert json.loads(o.text) == json.loads(llm.tokenizer.decode(o.token_ids))
    assert results[True] == results[False]
    for prompt, schema, adapter, got in zip(prompts[:3], schemas, adapters, results[True]):
        assert got == reference_greedy(ref_models[adapter], llm.tokenizer, prompt, schema, 48)


def test_sampled_json_object_and_logprobs(models):
    root, _ = models
    llm = LLM(str(root / "base"), num_kv_blocks=256)
    so = StructuredOutputsParams(json_object=True)
    outs = llm.generate(["{", "Hi"] * 4, [SamplingParams(max_tokens=64, temperature=1.0, seed=i, structured_outputs=so,
                                                         logprobs=3) for i in range(8)])
    for o in outs:
        if o.finish_reason == "stop":
            assert isinstance(json.loads(o.text), dict)
        else:   # cut by max_tokens: still a prefix the grammar accepts
            assert o.finish_reason == "length" and o.text.startswith("{")
        assert all(lp.logprob > float("-inf") for lp in o.logprobs)   # the chosen token was allowed
    assert any(o.finish_reason == "stop" for o in outs)
    first = outs[0].logprobs[0]   # the grammar forces "{": all the mass is on it, the rest is masked
    assert first.logprob == pytest.approx(0.0, abs=1e-6) and first.top[1][1] == float("-inf")


def test_bitmask_apply_matches_llguidance_reference(models):
    """Rows out of order, a vocabulary that is not a multiple of 32, matchers in different states."""
    from transformers import AutoTokenizer
    root, _ = models
    tok = AutoTokenizer.from_pretrained(root / "base")
    V = 390
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=V, eos_token=[EOS])
    grammar = llguidance.LLMatcher.grammar_from_json_schema(Pet.model_json_schema(), defaults=JSON_OPTIONS)
    matchers = [llguidance.LLMatcher(lltok, grammar) for _ in range(3)]
    for m, text in zip(matchers, ['{"kind": "', '{"kind": "dog", "age": 1', '']):
        assert m.consume_tokens(tok.encode(text, add_special_tokens=False))
    logits = torch.randn(5, V)
    rows = [3, 0, 4]
    got = TokenBitmask().apply(logits, rows, [Grammar(m) for m in matchers])
    ref = logits.numpy().copy()
    mask = llnp.allocate_token_bitmask(5, V)
    for m, r in zip(matchers, rows):
        llnp.fill_next_token_bitmask(m, mask, r)
    llnp.apply_token_bitmask_inplace(ref, mask)
    np.testing.assert_array_equal(got.numpy(), ref)
    assert torch.isinf(got[3]).sum() > 0 and torch.equal(got[1], logits[1])


def test_unusable_schemas_are_request_errors(models, llama_dir):
    root, _ = models
    llm = LLM(str(root / "base"), num_kv_blocks=64)
    for schema, words in [({"type": "foo"}, "Invalid type"), ({"type": "string", "format": "weird"}, "format"),
                          ({"type": "string", "pattern": "(("}, "regex"),
                          ({"$ref": "http://example.com/s"}, "not present"), ("not json", "schema"),
                          ({"type": "object", "default": {1, 2}}, "not JSON")]:
        with pytest.raises(RequestError, match=words):
            llm.generate(["Hi"], json_params(schema))
    assert not llm.engine.has_unfinished() and not llm.engine.requests
    with pytest.raises(RequestError, match="exactly one"):
        StructuredOutputsParams()
    no_tokenizer = LLM(str(llama_dir), num_kv_blocks=64)
    with pytest.raises(RequestError, match="tokenizer"):
        no_tokenizer.generate([[5, 6]], json_params(Pet.model_json_schema()))
