"""`logit_bias` and `response_format` through the official OpenAI client against a real server:
outputs equal `LLM.generate` with the same sampling parameters, and bad values get 400s that
name the field."""

import asyncio
import json

import openai
import pytest
from helpers import write_adapter, write_model_with_tokenizer
from pydantic import BaseModel
from test_server_api import API_KEY, BASE, CHAT_STOP_IDS, Server, assert_error, chat_prompt, greedy, post
from test_structured import Order, Pet

from loquetier import LLM, StructuredOutputsParams


def json_schema_format(model: type[BaseModel]) -> dict:
    return {"type": "json_schema", "json_schema": {"name": model.__name__, "schema": model.model_json_schema(),
                                                   "strict": True}}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling-api")
    hf = write_model_with_tokenizer(root / "model", "llama")
    write_adapter(hf, root / "a1", 8, ["q_proj", "v_proj", "down_proj"], seed=1)
    write_adapter(hf, root / "a2", 4, ["o_proj", "up_proj"], seed=2)
    server = Server(root / "model", root / "data", root / "server.log", "--adapter", f"a1={root / 'a1'}",
                    "--adapter", f"a2={root / 'a2'}", "--api-key", API_KEY)
    llm = LLM(str(root / "model"), max_lora_rank=16, num_kv_blocks=256)
    llm.load_adapter("a1", root / "a1")
    llm.load_adapter("a2", root / "a2")
    try:
        yield server, llm
    finally:
        server.stop()


def test_two_schemas_two_adapters_in_one_batch(env):
    """Concurrent chat requests with different schemas and adapters, the completions endpoint with a
    schema and with json_object, and the client's `parse` helper: each equals LLM.generate."""
    server, llm = env
    messages = [{"role": "user", "content": "Describe a pet."}]
    prompt = chat_prompt(llm, messages)
    jobs = [("a1", Pet), ("a2", Order), (BASE, Pet)]
    params = [greedy(48, stop_token_ids=CHAT_STOP_IDS,
                     structured_outputs=StructuredOutputsParams(json=model.model_json_schema())) for _, model in jobs]
    refs = llm.generate([prompt] * 3, params, [None if m == BASE else m for m, _ in jobs])

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        try:
            return await asyncio.gather(*(client.chat.completions.create(
                model=name, messages=messages, max_tokens=48, temperature=0, response_format=json_schema_format(model))
                for name, model in jobs))
        finally:
            await client.close()

    for resp, (_, model), ref in zip(asyncio.run(main()), jobs, refs):
        choice = resp.choices[0]
        assert choice.finish_reason == "stop" and choice.message.content == ref.text
        model.model_validate_json(choice.message.content)
    client = server.client()
    parsed = client.chat.completions.parse(model="a1", messages=messages, max_tokens=48, temperature=0,
                                           response_format=Pet)
    assert isinstance(parsed.choices[0].message.parsed, Pet) and parsed.choices[0].finish_reason == "stop"
    for name, fmt, so in [("a2", json_schema_format(Order), StructuredOutputsParams(json=Order.model_json_schema())),
                          (BASE, {"type": "json_object"}, StructuredOutputsParams(json_object=True))]:
        resp = client.completions.create(model=name, prompt="Order:", max_tokens=48, temperature=0,
                                         extra_body={"response_format": fmt})
        ref = llm.generate("Order:", greedy(48, structured_outputs=so), None if name == BASE else name)[0]
        assert resp.choices[0].text == ref.text and resp.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(resp.choices[0].text), dict)
    text = client.chat.completions.create(model=BASE, messages=messages, max_tokens=8, temperature=0,
                                          response_format={"type": "text"}).choices[0].message.content
    assert text == llm.generate(prompt, greedy(8, stop_token_ids=CHAT_STOP_IDS))[0].text
    # logprobs of forced tokens: the masked alternatives are reported as vLLM does (-9999), in valid JSON
    resp = client.chat.completions.create(model=BASE, messages=messages, max_tokens=48, temperature=0, logprobs=True,
                                          top_logprobs=2, response_format=json_schema_format(Pet))
    first = resp.choices[0].logprobs.content[0]
    assert first.token == "{" and first.logprob == pytest.approx(0.0, abs=1e-5)
    assert first.top_logprobs[1].logprob == -9999.0


def test_logit_bias(env):
    server, llm = env
    client = server.client()
    forced = client.completions.create(model="a1", prompt="Hello", max_tokens=6, temperature=0,
                                       logit_bias={"77": 100})
    ref = llm.generate("Hello", greedy(6, logit_bias={77: 100}), "a1")[0]
    assert ref.token_ids == [77] * 6 and forced.choices[0].text == ref.text
    messages = [{"role": "user", "content": "Hi"}]
    prompt = chat_prompt(llm, messages)
    free = llm.generate(prompt, greedy(8, stop_token_ids=CHAT_STOP_IDS))[0]
    ban = {free.token_ids[0]: -100}
    ref = llm.generate(prompt, greedy(8, stop_token_ids=CHAT_STOP_IDS, logit_bias=ban))[0]
    assert ref.token_ids[0] != free.token_ids[0]
    chat = client.chat.completions.create(model=BASE, messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                          logit_bias={str(t): b for t, b in ban.items()})
    assert chat.choices[0].message.content == ref.text
    # logprobs stay the model's own (vLLM's raw logprobs): those of the unbiased distribution
    unbiased = dict(llm.generate(prompt, greedy(1, logprobs=20))[0].logprobs[0].top)
    assert chat.choices[0].logprobs.content[0].logprob == pytest.approx(unbiased[ref.token_ids[0]], abs=1e-4)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="a1", prompt="Hello", max_tokens=6, temperature=0, logit_bias={"77": 100}, stream=True) if c.choices)
    assert streamed == forced.choices[0].text


def test_bad_bias_and_formats_get_400_naming_the_field(env):
    server, _ = env
    comp = lambda **body: post(server, "/v1/completions", json={"model": BASE, "prompt": "Hi", **body})  # noqa: E731
    chat = lambda **body: post(server, "/v1/chat/completions", json={  # noqa: E731
        "model": "a1", "messages": [{"role": "user", "content": "Hi"}], **body})
    for bias, words in [({"abc": 1}, "token ids"), ({"-3": 1}, "token ids"), ({"5": 101}, "[-100, 100]"),
                        ({"5": "x"}, "numbers"), ({"5": True}, "numbers"), ([5], "object")]:
        assert assert_error(comp(logit_bias=bias), 400, "logit_bias", words)["param"] == "logit_bias"
        assert assert_error(chat(logit_bias=bias), 400, "logit_bias")["param"] == "logit_bias"
    for token in ("384", "9" * 30):
        assert assert_error(comp(logit_bias={token: 1}), 400, "logit_bias")["param"] == "logit_bias"
    assert assert_error(chat(response_format={"type": "regex"}), 400)["param"] == "response_format.type"
    assert_error(chat(response_format={"type": "json_schema"}), 400, "response_format", "json_schema")
    assert assert_error(chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
                        400)["param"].startswith("response_format.json_schema")
    for schema, words in [({"type": "foo"}, "Invalid type"), ({"type": "string", "format": "weird"}, "format"),
                          ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}}, "regex")]:
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        for call in (comp, chat):
            err = assert_error(call(response_format=fmt), 400, "response_format.json_schema.schema", words)
            assert err["param"] == "response_format.json_schema.schema"
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        server.client().completions.create(model=BASE, prompt="Hi", max_tokens=2, logit_bias={"5": 200})
    health = server.health()
    assert health["status"] == "ok" and health["kv_blocks_used"] == 0
