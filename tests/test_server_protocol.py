"""Request validation and defaults, and round trips with the official `openai` client (no network)."""

import json

import httpx
import pytest
from pydantic import ValidationError

from loquetier.server.protocol import (
    SSE_DONE,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
    ChatStreamChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CreateFineTuningJobRequest,
    DeltaMessage,
    FileObject,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobCheckpointList,
    FineTuningJobEvent,
    FineTuningJobEventList,
    Hyperparameters,
    ListPage,
    LoadLoRAAdapterRequest,
    LoraParams,
    ModelCard,
    ModelList,
    UnloadLoRAAdapterRequest,
    UsageInfo,
    error_body,
    new_id,
    sse_data,
    validation_error_body,
)

openai = pytest.importorskip("openai")


def _error(model, body: dict) -> dict:
    with pytest.raises(ValidationError) as exc:
        model.model_validate(body)
    return validation_error_body(exc.value.errors())["error"]


def _message(model, body: dict) -> str:
    with pytest.raises(ValidationError) as exc:
        model.model_validate(body)
    return validation_error_body(exc.value.errors())["error"]["message"]


def test_completion_defaults():
    req = CompletionRequest.model_validate({"model": "m", "prompt": "hi"})
    assert req.max_tokens == 16 and req.n == 1 and req.temperature == 1.0 and req.top_p == 1.0
    assert req.top_k is None and req.logprobs is None and not req.stream and not req.echo
    assert req.stop_list == [] and req.prompts() == ["hi"] and not req.include_usage


def test_nulls_mean_defaults_and_unknown_fields_are_refused():
    req = CompletionRequest.model_validate(
        {"model": "m", "prompt": "hi", "max_tokens": None, "temperature": None, "best_of": 1,
         "suffix": None, "echo": False, "user": "u1"})
    assert req.max_tokens == 16 and req.temperature == 1.0
    body = _error(CompletionRequest, {"model": "m", "prompt": "hi", "whatever": [1, 2]})
    assert body["param"] == "whatever" and "unknown field" in body["message"]
    body = _error(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x", "colour": 1}]})
    assert body["param"] == "messages.0.colour"


@pytest.mark.parametrize("prompt, expected", [
    ("a", ["a"]), (["a", "b"], ["a", "b"]), ([1, 2, 3], [[1, 2, 3]]), ([[1], [2, 3]], [[1], [2, 3]])])
def test_prompt_shapes(prompt, expected):
    assert CompletionRequest(model="m", prompt=prompt).prompts() == expected


@pytest.mark.parametrize("body, needle", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n:"), ({"n": 17}, "n:"),
    ({"temperature": -0.1}, "temperature"), ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k must be -1 or 0 (off) or at least 1"),
    ({"min_p": 1.5}, "min_p"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"logprobs": 21}, "logprobs"), ({"logprobs": -1}, "logprobs"),
    ({"echo": True}, "echo=true is not supported"),
    ({"prompt": []}, "prompt must not be an empty list"),
    ({"prompt": [[1], []]}, "empty list of token ids"),
    ({"prompt": [1, "a"]}, "prompt must be a string, a list of strings"),
    ({"prompt": {"a": 1}}, "prompt must be a string"),
    ({"prompt": [-1]}, "non-negative"),
    ({"stream_options": {"include_usage": True}}, "stream_options is only allowed when stream is true"),
])
def test_completion_validation_messages(body, needle):
    assert needle in _message(CompletionRequest, {"model": "m", "prompt": "hi", **body})


def test_completion_top_k_off_values_and_stop():
    assert CompletionRequest(model="m", prompt="x", top_k=-1).top_k is None
    assert CompletionRequest(model="m", prompt="x", top_k=0).top_k is None
    assert CompletionRequest(model="m", prompt="x", top_k=40).top_k == 40
    assert CompletionRequest(model="m", prompt="x", stop="\n").stop_list == ["\n"]
    assert CompletionRequest(model="m", prompt="x", stop=["a", "", "b"]).stop_list == ["a", "b"]


def test_chat_fields():
    req = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                {"type": "text", "text": "b"}]}],
        "max_tokens": 5, "logprobs": True, "top_logprobs": 3, "stream": True,
        "stream_options": {"include_usage": True}})
    assert req.max_new_tokens == 5 and req.messages[1].text() == "ab" and req.include_usage
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}],
                                max_tokens=5, max_completion_tokens=7)
    assert req.max_new_tokens == 7
    assert ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}]).max_new_tokens is None


@pytest.mark.parametrize("body, needle", [
    ({"messages": []}, "messages"),
    ({"top_logprobs": 2}, "top_logprobs requires logprobs=true"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
     "only text content parts"),
])
def test_chat_validation_messages(body, needle):
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert needle in _message(ChatCompletionRequest, {**base, **body})


def test_error_body_shape():
    assert error_body("no such model", code="model_not_found", param="model") == {
        "error": {"message": "no such model", "type": "invalid_request_error", "param": "model",
                  "code": "model_not_found"}}
    body = validation_error_body([{"loc": ("body", "temperature"), "msg": "Input should be less than or equal to 2"}])
    assert body["error"]["message"] == "temperature: Input should be less than or equal to 2"
    assert body["error"]["param"] == "temperature"


def test_fine_tuning_request():
    req = CreateFineTuningJobRequest.model_validate({
        "model": "base", "training_file": "file-abc",
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
        "lora": {"r": 8, "alpha": 16}})
    assert req.resolved_hyperparameters().n_epochs == 2 and req.lora.r == 8
    legacy = CreateFineTuningJobRequest(model="b", training_file="f", hyperparameters={"batch_size": 4})
    assert legacy.resolved_hyperparameters().batch_size == 4 and legacy.lora == LoraParams()
    assert "suffix may only contain" in _message(CreateFineTuningJobRequest,
                                                 {"model": "b", "training_file": "f", "suffix": "a:b"})
    assert "only method type 'supervised'" in _message(
        CreateFineTuningJobRequest, {"model": "b", "training_file": "f", "method": {"type": "dpo"}})
    assert "n_epochs must be 'auto' or at least 1" in _message(Hyperparameters, {"n_epochs": 0})
    assert "learning_rate_multiplier" in _message(Hyperparameters, {"learning_rate_multiplier": 0})
    assert _message(LoraParams, {"r": 0}).startswith("r:")


def test_adapter_requests():
    assert LoadLoRAAdapterRequest(lora_name="a", lora_path="p/q").lora_path == "p/q"
    assert UnloadLoRAAdapterRequest.model_validate({"lora_name": "a"}).lora_name == "a"
    assert "lora_path" in _message(LoadLoRAAdapterRequest, {"lora_name": "a"})


def test_ids_and_sse():
    assert new_id("file").startswith("file-") and new_id("x") != new_id("x")
    usage = UsageInfo.of(3, 4)
    assert usage.total_tokens == 7
    line = sse_data(usage)
    assert line.startswith("data: ") and line.endswith("\n\n") and json.loads(line[6:])["total_tokens"] == 7


# -- round trips through the official client ----------------------------------------------------


def _client(handler) -> "openai.OpenAI":
    """An `openai.OpenAI` whose HTTP requests go to `handler` instead of the network."""
    http = httpx.Client(transport=httpx.MockTransport(handler))
    return openai.OpenAI(api_key="sk-test", base_url="http://test/v1", http_client=http, max_retries=0)


def test_openai_client_completion_payload_parses_and_response_reads_back():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["req"] = CompletionRequest.model_validate_json(request.content)
        body = CompletionResponse(model=seen["req"].model, usage=UsageInfo.of(3, 2),
                                  choices=[CompletionChoice(index=0, text=" world", finish_reason="length")])
        return httpx.Response(200, json=body.model_dump())

    out = _client(handler).completions.create(
        model="base:adapter", prompt=[1, 2, 3], max_tokens=2, temperature=0, seed=7, stop=["\n"],
        logprobs=2, extra_body={"top_k": 5, "ignore_eos": True, "stop_token_ids": [2]})
    req = seen["req"]
    assert (req.model, req.prompts(), req.max_tokens, req.temperature, req.seed) == ("base:adapter", [[1, 2, 3]], 2, 0, 7)
    assert req.logprobs == 2 and req.top_k == 5 and req.ignore_eos and req.stop_token_ids == [2]
    assert out.choices[0].text == " world" and out.usage.total_tokens == 5 and out.id.startswith("cmpl-")


def test_openai_client_chat_payload_parses_and_response_reads_back():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["req"] = ChatCompletionRequest.model_validate_json(request.content)
        body = ChatCompletionResponse(model="m", usage=UsageInfo.of(5, 1), choices=[
            ChatChoice(index=0, message=ChatResponseMessage(content="hi"), finish_reason="stop")])
        return httpx.Response(200, json=body.model_dump())

    out = _client(handler).chat.completions.create(
        model="m", messages=[{"role": "developer", "content": "x"}, {"role": "user", "content": "hello"}],
        max_completion_tokens=4, logprobs=True, top_logprobs=2, n=2, top_p=0.9,
        presence_penalty=0.5, frequency_penalty=0.1, user="u1")
    req = seen["req"]
    assert req.max_new_tokens == 4 and req.logprobs and req.top_logprobs == 2 and req.n == 2
    assert req.messages[1].text() == "hello" and req.user == "u1"
    assert out.choices[0].message.content == "hi" and out.choices[0].finish_reason == "stop"


def test_openai_client_reads_list_and_job_objects():
    job = FineTuningJob(id="ftjob-1", model="base", created_at=1, status="running", training_file="file-1",
                        hyperparameters=Hyperparameters(n_epochs=3), lora=LoraParams(r=4))
    event = FineTuningJobEvent(id="ftevent-1", created_at=2, message="step 1", type="metrics", data={"loss": 1.5})
    ckpt = FineTuningJobCheckpoint(id="ftckpt-1", created_at=3, fine_tuned_model_checkpoint="a:step-10",
                                   step_number=10, metrics={"train_loss": 1.2}, fine_tuning_job_id="ftjob-1")
    bodies = {
        "/v1/models": ModelList(data=[ModelCard(id="base", root="base"), ModelCard(id="a", parent="base")]),
        "/v1/files/file-1": FileObject(id="file-1", bytes=10, created_at=1, filename="d.jsonl", purpose="fine-tune"),
        "/v1/fine_tuning/jobs/ftjob-1": job,
        "/v1/fine_tuning/jobs/ftjob-1/events": FineTuningJobEventList(data=[event]),
        "/v1/fine_tuning/jobs/ftjob-1/checkpoints": FineTuningJobCheckpointList(
            data=[ckpt], first_id="ftckpt-1", last_id="ftckpt-1"),
    }
    client = _client(lambda request: httpx.Response(200, json=bodies[request.url.path].model_dump()))
    assert [m.id for m in client.models.list()] == ["base", "a"]
    assert client.files.retrieve("file-1").filename == "d.jsonl"
    got = client.fine_tuning.jobs.retrieve("ftjob-1")
    assert got.status == "running" and got.hyperparameters.n_epochs == 3
    assert list(client.fine_tuning.jobs.list_events("ftjob-1"))[0].message == "step 1"
    assert list(client.fine_tuning.jobs.checkpoints.list("ftjob-1"))[0].step_number == 10


def test_openai_client_fine_tuning_create_payload_parses():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["req"] = CreateFineTuningJobRequest.model_validate_json(request.content)
        job = FineTuningJob(id="ftjob-2", model="base", created_at=1, status="queued", training_file="file-1")
        return httpx.Response(200, json=job.model_dump())

    _client(handler).fine_tuning.jobs.create(
        model="base", training_file="file-1", suffix="mine", seed=3,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 8}}},
        extra_body={"lora": {"r": 8, "target_modules": ["q_proj"]}})
    req = seen["req"]
    assert req.resolved_hyperparameters().batch_size == 8 and req.lora.target_modules == ["q_proj"]
    assert req.suffix == "mine" and req.seed == 3


def test_list_page_shape():
    page = ListPage[FileObject](data=[], has_more=False)
    assert page.model_dump() == {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}


def test_openai_client_reads_our_stream_chunks():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        req = seen["req"] = ChatCompletionRequest.model_validate_json(request.content)
        chunks = [ChatCompletionStreamResponse(id="chatcmpl-1", model=req.model, choices=[
                      ChatStreamChoice(index=0, delta=DeltaMessage(role="assistant", content=text))])
                  for text in ("Hel", "lo")]
        chunks.append(ChatCompletionStreamResponse(id="chatcmpl-1", model=req.model, choices=[
            ChatStreamChoice(index=0, delta=DeltaMessage(), finish_reason="stop")]))
        chunks.append(ChatCompletionStreamResponse(id="chatcmpl-1", model=req.model, usage=UsageInfo.of(3, 2)))
        body = "".join(sse_data(c) for c in chunks) + SSE_DONE
        return httpx.Response(200, content=body.encode(), headers={"content-type": "text/event-stream"})

    stream = _client(handler).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert seen["req"].stream and seen["req"].include_usage
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-1].usage.total_tokens == 5
