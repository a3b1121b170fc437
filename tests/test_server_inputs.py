"""Input the client chooses, against the real server of conftest.py's `api_server`: every accepted
field works or gets a 400 naming it.

Lone UTF-16 surrogates, unknown fields, OpenAI fields the server does not implement (through the
official client), fields accepted without effect, and adapters selected by full module names.
"""

import json

import httpx
import openai
import pytest
from helpers import API_KEY, BASE, assert_error, post, write_adapter

from loquetier import SamplingParams
from loquetier.errors import RequestError
from loquetier.server.completions import _on_client_text
from loquetier.server.protocol import ChatMessage

CHAT_STOP_IDS = (2, 6)   # </s> and <|end|> of the tiny tokenizer
FULL_PATHS = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "layers.1.self_attn.v_proj"]


@pytest.fixture
def env(api_server):
    root, server, llm = api_server
    hf = None
    for name, targets in (("paths", FULL_PATHS), ("head", ["q_proj", "lm_head"])):
        if not (root / "adapters" / name).exists():
            if hf is None:
                import transformers as tf
                hf = tf.AutoModelForCausalLM.from_pretrained(root / "model")
            write_adapter(hf, root / "adapters" / name, 4, targets, seed=5)
    return root, server, llm


def raw_post(server, path: str, body: bytes) -> httpx.Response:
    """POST a JSON body exactly as written (the openai client and httpx would refuse to encode a surrogate)."""
    return httpx.post(f"{server.url}{path}", content=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})


def bad_request(call) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as exc:
        call()
    return exc.value


# ------------------------------------------------------------------------------------ lone surrogates
COMP = '{"model": "tiny", "max_tokens": 2, %s}'
CHAT = '{"model": "tiny", "max_tokens": 2, "messages": [%s]}'
SURROGATE_BODIES = [  # (route, body with a JSON escape of half a surrogate pair, the field named)
    ("/v1/completions", COMP % '"prompt": "ab\\ud800c"', "prompt"),
    ("/v1/completions", COMP % '"prompt": ["ok", "x\\udfff"]', "prompt.1"),
    ("/v1/completions", COMP % '"prompt": "ok", "stop": ["\\ud83d"]', "stop.0"),
    ("/v1/completions", COMP % '"prompt": "ok", "user": "\\ud800"', "user"),
    ("/v1/completions", COMP % '"prompt": "ok", "suffix": "\\ud800"', "suffix"),
    ("/v1/completions", '{"model": "\\ud800", "prompt": "ok"}', "model"),
    ("/v1/chat/completions", CHAT % '{"role": "user", "content": "hi \\ud800"}', "messages.0.content"),
    ("/v1/chat/completions", CHAT % '{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}',
     "messages.0.content.0.text"),
    ("/v1/chat/completions", CHAT % '{"role": "user", "content": "hi", "name": "\\ud800"}', "messages.0.name"),
    ("/v1/chat/completions", CHAT % '{"role": "assistant", "content": "", "tool_calls": [{"id": "\\ud800"}]}',
     "messages.0.tool_calls.0.id"),
    ("/v1/load_lora_adapter", '{"lora_name": "\\ud800", "lora_path": "paths"}', "lora_name"),
    ("/v1/load_lora_adapter", '{"lora_name": "x", "lora_path": "p\\ud800"}', "lora_path"),
    ("/v1/fine_tuning/jobs", '{"model": "tiny", "training_file": "file-\\ud800"}', "training_file"),
]


def test_lone_surrogates_get_a_400_naming_the_field(env):
    _, server, _ = env
    for route, body, field in SURROGATE_BODIES:
        err = assert_error(raw_post(server, route, body.encode()), 400, "surrogate")
        assert err["param"] == field, (body, err)
    bad_line = b'{"prompt": "1+1=\\ud800", "completion": "2"}\n'
    r = post(server, "/v1/files", files={"file": ("s.jsonl", bad_line)}, data={"purpose": "fine-tune"})
    assert_error(r, 400, "line 1", "surrogate")
    # a complete pair is one character, and works; the server is unharmed
    ok = raw_post(server, "/v1/completions", (COMP % '"prompt": "smile \\ud83d\\ude00"').encode())
    assert ok.status_code == 200, ok.text
    assert server.health()["status"] == "ok"


# ------------------------------------------------------------------------------------ unknown fields
def test_unknown_fields_and_parameters_get_a_400_naming_them(env):
    _, server, _ = env
    cases = [
        ("/v1/completions", {"model": BASE, "prompt": "x", "max_token": 3}, "max_token"),
        ("/v1/completions", {"model": BASE, "prompt": "x", "stream": True,
                             "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
         "stream_options.continuous_usage_stats"),
        ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": "x", "audio": {"id": "a"}}]},
         "messages.0.audio"),
        ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": "x"}], "echo": True}, "echo"),
        ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": "x"}],
                                  "chat_template_kwargs": {}}, "chat_template_kwargs"),
        ("/v1/fine_tuning/jobs", {"model": BASE, "training_file": "f", "lora": {"r": 4, "bias": "all"}}, "lora.bias"),
        ("/v1/fine_tuning/jobs", {"model": BASE, "training_file": "f",
                                  "hyperparameters": {"n_epochs": 1, "warmup": 3}}, "hyperparameters.warmup"),
        ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "paths", "load_inplace": True}, "load_inplace"),
    ]
    for route, body, field in cases:
        err = assert_error(post(server, route, json=body), 400, "unknown field")
        assert err["param"] == field, (body, err)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    err = assert_error(httpx.get(f"{server.url}/v1/models?verbose=1", headers=headers), 400, "verbose")
    assert err["param"] == "verbose"
    assert_error(httpx.get(f"{server.url}/v1/fine_tuning/jobs?metadata[k]=v", headers=headers), 400, "metadata")
    assert httpx.get(f"{server.url}/v1/files?limit=2&order=asc", headers=headers).status_code == 200
    r = post(server, "/v1/files", files={"file": ("d.jsonl", b'{"text": "a"}\n')},
             data={"purpose": "fine-tune", "tags": "x"})
    assert assert_error(r, 400, "tags")["param"] == "tags"


# ------------------------------------------------------------------------------------ OpenAI fields we refuse
def test_openai_fields_not_implemented_get_a_400_through_the_client(env):
    _, server, _ = env
    client = server.client()
    msgs = [{"role": "user", "content": "Hi"}]
    chat = lambda **kw: client.chat.completions.create(model=BASE, messages=msgs, max_tokens=2, **kw)  # noqa: E731
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    refused = {
        "tools": dict(tools=[tool]),
        "tool_choice": dict(tool_choice="auto"),
        "functions": dict(functions=[tool["function"]]),
        "function_call": dict(function_call="auto"),
        "audio": dict(audio={"voice": "alloy", "format": "wav"}),
        "modalities": dict(modalities=["text", "audio"]),
        "prediction": dict(prediction={"type": "content", "content": "x"}),
        "store": dict(store=True),
        "reasoning_effort": dict(reasoning_effort="low"),
        "verbosity": dict(verbosity="low"),
        "web_search_options": dict(web_search_options={}),
        "service_tier": dict(service_tier="flex"),
        "stream_options.include_obfuscation": dict(stream=True, stream_options={"include_obfuscation": True}),
        "top_logprobs": dict(top_logprobs=2),
    }
    for field, kw in refused.items():
        err = bad_request(lambda: chat(**kw))
        assert err.body["param"] == field, (field, err.body)
    comp = lambda **kw: client.completions.create(model=BASE, prompt="Hi", max_tokens=2, **kw)  # noqa: E731
    for field, kw in {"best_of": dict(best_of=3, n=1), "echo": dict(echo=True), "suffix": dict(suffix="end")}.items():
        assert bad_request(lambda: comp(**kw)).body["param"] == field
    jobs = client.fine_tuning.jobs
    for field, kw in {"integrations": dict(integrations=[{"type": "wandb", "wandb": {"project": "p"}}]),
                      "metadata": dict(metadata={"k": "v"}),
                      "hyperparameters": dict(hyperparameters={"n_epochs": 1},
                                              method={"type": "supervised",
                                                      "supervised": {"hyperparameters": {"n_epochs": 2}}}),
                      "method.type": dict(method={"type": "dpo"})}.items():
        assert bad_request(lambda: jobs.create(model=BASE, training_file="file-x", **kw)).body["param"] == field
    data = client.files.create(file=("d.jsonl", b'{"prompt": "1+1=", "completion": "2"}\n'), purpose="fine-tune")
    err = bad_request(lambda: jobs.create(model=BASE, training_file=data.id, extra_body={
        "lora": {"target_modules": ["q_proj", "q_prj"]}}))
    assert "q_prj" in err.body["message"] and err.body["param"] == "lora.target_modules"
    err = bad_request(lambda: client.files.create(file=("d.jsonl", b'{"text": "a"}\n'), purpose="fine-tune",
                                                  expires_after={"anchor": "created_at", "seconds": 3600}))
    assert err.body["param"] == "expires_after"
    r = post(server, "/v1/unload_lora_adapter", json={"lora_name": "x", "lora_int_id": 3})
    assert assert_error(r, 400, "lora_name")["param"] == "lora_int_id"
    assert server.health()["num_requests_waiting"] == 0


def test_fields_accepted_without_effect_change_nothing(env):
    _, server, _ = env
    client = server.client()
    msgs = [{"role": "user", "content": "What is 2+3?"}]
    plain = client.chat.completions.create(model=BASE, messages=msgs, max_tokens=8, temperature=0)
    noop = client.chat.completions.create(
        model=BASE, messages=msgs, max_tokens=8, temperature=0, user="u-1", metadata={"team": "a"}, store=False,
        tool_choice="none", function_call="none", parallel_tool_calls=False, modalities=["text"],
        service_tier="auto", prompt_cache_key="k", safety_identifier="s-1",
        extra_body={"prompt_cache_retention": "in_memory"})
    assert noop.choices[0].message.content == plain.choices[0].message.content
    a = client.completions.create(model=BASE, prompt="1+1=", max_tokens=6, temperature=0, n=2, best_of=2,
                                  echo=False, suffix="", user="u")
    b = client.completions.create(model=BASE, prompt="1+1=", max_tokens=6, temperature=0, n=2)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    # an earlier turn's name and tool calls are history handed to the template, not refused
    history = [{"role": "user", "content": "hi", "name": "ann"},
               {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function",
                                                                    "function": {"name": "f", "arguments": "{}"}}]},
               {"role": "tool", "content": "42", "tool_call_id": "c1"}]
    assert client.chat.completions.create(model=BASE, messages=history, max_tokens=2).choices


def test_message_fields_reach_the_chat_template():
    m = ChatMessage.model_validate({"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                     {"type": "text", "text": "b"}], "name": "n"})
    assert m.for_template() == {"role": "system", "content": "ab", "name": "n"}
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    m = ChatMessage.model_validate({"role": "assistant", "content": None, "tool_calls": calls})
    assert m.for_template() == {"role": "assistant", "content": "", "tool_calls": calls}


def test_ignore_eos_also_ignores_chat_end_tokens(env):
    """A chat reply stops on end-of-turn tokens; with ignore_eos it runs to max_tokens, as in vLLM."""
    _, server, llm = env
    tok = llm.tokenizer
    conversations = [[{"role": "user", "content": f"question {i}: " + "ab" * (i % 7)}] for i in range(48)]
    prompts = [tok.encode(tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False) for c in conversations]
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    # a conversation whose greedy reply emits an end token early
    early = [c for c, o in zip(conversations, outs) if any(t in CHAT_STOP_IDS for t in o.token_ids[:-1])]
    assert early, "no conversation with an early end token found; widen the search"
    messages = early[0]
    reply = server.client().chat.completions.create(model=BASE, messages=messages, max_tokens=12, temperature=0,
                                                    extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 12 and reply.choices[0].finish_reason == "length"
    stopped = server.client().chat.completions.create(model=BASE, messages=messages, max_tokens=12, temperature=0)
    assert stopped.usage.completion_tokens < 12


# ------------------------------------------------------------------------------------ catch-all
class PanicException(BaseException):
    """Stands in for pyo3's PanicException (a Rust panic in the tokenizer), which is a BaseException."""


def test_tokenizer_failures_on_client_text_are_400s_and_other_errors_pass():
    def raises(exc):
        def fn(*_args, **_kwargs):
            raise exc
        return fn
    for exc in (TypeError("TextEncodeInput must be ..."), ValueError("bad"), PanicException("rust panic")):
        with pytest.raises(RequestError) as err:
            _on_client_text("prompt", "the tokenizer cannot encode this text", raises(exc), "x")
        assert err.value.param == "prompt" and err.value.status == 400 and type(exc).__name__ in str(err.value)
    with pytest.raises(KeyboardInterrupt):
        _on_client_text("prompt", "what", raises(KeyboardInterrupt()), "x")
    assert _on_client_text("prompt", "what", lambda s: s.upper(), "x") == "X"


# ------------------------------------------------------------------------------------ adapters by module name
def test_adapters_with_full_module_names_load_and_others_are_refused(env):
    root, server, llm = env
    assert post(server, "/v1/load_lora_adapter", json={"lora_name": "paths", "lora_path": "paths"}).status_code == 200
    llm.load_adapter("paths", root / "adapters" / "paths")
    want = llm.generate(["1+2="], SamplingParams(max_tokens=8, temperature=0), adapters=["paths"])[0].text
    got = server.client().completions.create(model="paths", prompt="1+2=", max_tokens=8, temperature=0)
    assert got.choices[0].text == want
    cfg = json.loads((root / "adapters" / "head" / "adapter_config.json").read_text())
    assert "lm_head" in cfg["target_modules"]
    r = post(server, "/v1/load_lora_adapter", json={"lora_name": "head", "lora_path": "head"})
    assert_error(r, 400, "lm_head", "projections")
