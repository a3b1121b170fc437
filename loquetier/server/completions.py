"""/v1/completions and /v1/chat/completions: requests to engine requests, outputs to OpenAI bodies.

A request becomes one engine request per (prompt, choice); choice i of a seeded request uses seed+i.
Non-streamed responses wait for every choice (aborting them if the client goes away); streamed ones
send server-sent events as tokens arrive, then a usage chunk when asked, then `[DONE]`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine.engine import RequestOutput
from ..engine.sequence import TokenLogprob
from ..errors import LoquetierError, RequestError
from ..sampling_params import SamplingParams, StructuredOutputsParams
from .engine_loop import (
    AsyncEngine,
    GenerationRequest,
    IncrementalDetokenizer,
    RequestGroup,
)
from .protocol import (
    SSE_DONE,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    ResponseFormat,
    SamplingRequest,
    TopLogprob,
    UsageInfo,
    error_body,
    new_id,
    sse_data,
)

log = logging.getLogger("loquetier.server")
R = TypeVar("R")

# End-of-turn tokens of common chat templates; those in the tokenizer's vocabulary stop chat replies.
SEED_RANGE = (-(2 ** 63), 2 ** 63 - 1)   # what torch.Generator.manual_seed accepts (int64)
CHAT_END_TOKENS = ("</s>", "<|end|>", "<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|endoftext|>",
                   "<|end_of_text|>", "<|eom_id|>")
MIN_LOGPROB = -9999.0   # what vLLM reports for a token of probability 0 (JSON has no -Infinity)


class GroupStreamingResponse(StreamingResponse):
    """A streaming response that aborts its engine requests however it ends (done, error, disconnect)."""

    def __init__(self, content: AsyncIterator[str], group: RequestGroup):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.group = group

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.group.close()


class CompletionService:
    """Serves both endpoints for one base model and its adapters."""

    def __init__(self, aengine: AsyncEngine, tokenizer, model_name: str):
        self.aengine = aengine
        self.tokenizer = tokenizer
        self.model_name = model_name
        engine = aengine.engine
        self.grammars = engine.grammars   # thread-safe: schemas compile off the engine thread
        self.context_len = min(engine.max_model_len, engine.kv.num_blocks * engine.kv.block_size)
        vocab = tokenizer.get_vocab() if tokenizer is not None else {}
        self.chat_stop_ids = sorted({vocab[t] for t in CHAT_END_TOKENS if t in vocab}
                                    | ({tokenizer.eos_token_id} if tokenizer is not None
                                       and tokenizer.eos_token_id is not None else set()))
        self._token_text: dict[int, str] = {}
        if tokenizer is not None:
            # the first encode may reset the tokenizer's truncation state (a mutable borrow in Rust); do it
            # now, before the engine thread decodes concurrently and could hit "Already borrowed"
            tokenizer.encode("warm up")

    # ------------------------------------------------------------------ endpoints
    async def complete(self, req: CompletionRequest, raw: Request) -> Response:
        batch = req.prompts()
        prompts = [self._encode(p, "prompt" if len(batch) == 1 else f"prompt.{i}") for i, p in enumerate(batch)]
        k = req.logprobs
        structured = await self._structured_outputs(req.response_format)
        requests = [GenerationRequest(ids, self._params(req, req.max_tokens, k, [], req.seed, j, structured),
                                      self._adapter(req)) for ids in prompts for j in range(req.n)]
        group = await self.aengine.add(requests)
        prompt_tokens = sum(len(p) for p in prompts)
        if req.stream:
            return GroupStreamingResponse(self._stream(req, group, prompt_tokens, chat=False), group)
        outs = await _results_or_disconnect(group, raw)
        if outs is None:
            return Response(status_code=499)
        choices = [CompletionChoice(index=i, text=o.text, finish_reason=o.finish_reason,
                                    logprobs=self._completion_logprobs(o.logprobs, 0) if k is not None else None)
                   for i, o in enumerate(outs)]
        return JSONResponse(CompletionResponse(model=req.model, choices=choices, usage=_usage(prompt_tokens, outs))
                            .model_dump())

    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        ids = self._chat_prompt(req)
        max_tokens = req.max_new_tokens
        if max_tokens is None:
            max_tokens = self.context_len - len(ids)
            if max_tokens < 1:
                raise RequestError(f"the conversation is {len(ids)} tokens, which leaves no room to reply within "
                                   f"this model's context of {self.context_len} tokens; shorten the messages",
                                   param="messages")
        k = (req.top_logprobs or 0) if req.logprobs else None
        # end-of-turn tokens are EOS to a chat reply: ignore_eos ignores them too, as vLLM does
        stop_ids = [] if req.ignore_eos else self.chat_stop_ids
        structured = await self._structured_outputs(req.response_format)
        requests = [GenerationRequest(ids, self._params(req, max_tokens, k, stop_ids, req.seed, j, structured),
                                      self._adapter(req)) for j in range(req.n)]
        group = await self.aengine.add(requests)
        if req.stream:
            return GroupStreamingResponse(self._stream(req, group, len(ids), chat=True), group)
        outs = await _results_or_disconnect(group, raw)
        if outs is None:
            return Response(status_code=499)
        choices = [ChatChoice(index=i, message=ChatResponseMessage(content=o.text), finish_reason=o.finish_reason,
                              logprobs=self._chat_logprobs(o.logprobs) if k is not None else None)
                   for i, o in enumerate(outs)]
        return JSONResponse(ChatCompletionResponse(model=req.model, choices=choices, usage=_usage(len(ids), outs))
                            .model_dump())

    # ------------------------------------------------------------------ streaming
    async def _stream(self, req: SamplingRequest, group: RequestGroup, prompt_tokens: int,
                      chat: bool) -> AsyncIterator[str]:
        rid = new_id("chatcmpl" if chat else "cmpl")
        detok = [IncrementalDetokenizer(self.tokenizer, req.stop_list) for _ in range(group.size)]
        sent_tokens = [0] * group.size
        final: dict[int, RequestOutput] = {}
        want_logprobs = bool(req.logprobs) if chat else req.logprobs is not None
        try:
            if chat:
                for i in range(group.size):
                    yield sse_data(ChatCompletionStreamResponse(
                        id=rid, model=req.model,
                        choices=[ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))]))
            while not group.done:
                try:
                    latest = await group.next_outputs()
                except LoquetierError as e:
                    yield f"data: {_json(error_body(str(e), 'server_error', code=e.code))}\n\n"
                    break
                for i, out in sorted(latest.items()):
                    text = detok[i].delta(out)
                    new_lps = out.logprobs[sent_tokens[i]:] if want_logprobs and out.logprobs is not None else None
                    sent_tokens[i] = len(out.token_ids)
                    if out.finished:
                        final[i] = out
                    elif not text and not new_lps:
                        continue
                    reason = out.finish_reason if out.finished else None
                    if chat:
                        choice = ChatStreamChoice(index=i, delta=DeltaMessage(content=text or None),
                                                  finish_reason=reason,
                                                  logprobs=self._chat_logprobs(new_lps) if new_lps else None)
                        yield sse_data(ChatCompletionStreamResponse(id=rid, model=req.model, choices=[choice]))
                    else:
                        lps = self._completion_logprobs(new_lps, len(detok[i].sent) - len(text)) if new_lps else None
                        choice = CompletionChoice(index=i, text=text, finish_reason=reason, logprobs=lps)
                        yield sse_data(CompletionStreamResponse(id=rid, model=req.model, choices=[choice]))
            else:
                if req.include_usage:
                    usage = _usage(prompt_tokens, list(final.values()))
                    body = (ChatCompletionStreamResponse if chat else CompletionStreamResponse)(
                        id=rid, model=req.model, choices=[], usage=usage)
                    yield sse_data(body)
            yield SSE_DONE
        finally:
            group.close()

    # ------------------------------------------------------------------ helpers
    def _adapter(self, req: SamplingRequest) -> str | None:
        return None if req.model == self.model_name else req.model

    async def _structured_outputs(self, fmt: ResponseFormat | None) -> StructuredOutputsParams | None:
        """The grammar `response_format` asks for, compiled now (off the engine thread) so that an
        unusable schema gets a 400 naming the field and the engine finds it compiled."""
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            spec, field = StructuredOutputsParams(json_object=True), "response_format"
        else:
            spec = StructuredOutputsParams(json=fmt.json_schema.json_schema)
            field = "response_format.json_schema.schema"
        try:
            await asyncio.to_thread(self.grammars.compile, spec)
        except RequestError as e:
            raise RequestError(f"{field}: {e}", param=field) from None
        return spec

    def _params(self, req: SamplingRequest, max_tokens: int, logprobs: int | None, stop_ids: list[int],
                seed: int | None, choice: int, structured: StructuredOutputsParams | None) -> SamplingParams:
        if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1] - req.n:
            raise RequestError(f"seed must be a 64-bit integer (at most {SEED_RANGE[1] - req.n} with n={req.n}), "
                               f"got {seed}", param="seed")
        return SamplingParams(
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k or -1,
            min_p=req.min_p, repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, seed=None if seed is None else seed + choice,
            stop=req.stop_list, stop_token_ids=sorted(set(req.stop_token_ids or []) | set(stop_ids)),
            ignore_eos=req.ignore_eos, logprobs=logprobs, logit_bias=req.token_biases, structured_outputs=structured)

    def _tokenizer(self, param: str):
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer; send prompts as lists of token ids to /v1/completions",
                               param=param)
        return self.tokenizer

    def _encode(self, prompt: str | list[int], param: str) -> list[int]:
        if isinstance(prompt, list):
            return list(prompt)
        if not prompt:
            raise RequestError("prompt must not be empty", param=param)
        return _on_client_text(param, "the tokenizer cannot encode this text", self._tokenizer(param).encode, prompt)

    def _chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        tok = self._tokenizer("messages")
        if not tok.chat_template:
            raise RequestError("this model's tokenizer has no chat template; use /v1/completions", param="messages")
        messages = [m.for_template() for m in req.messages]
        text = _on_client_text("messages", "the chat template rejected these messages", tok.apply_chat_template,
                               messages, tokenize=False, add_generation_prompt=True)
        return _on_client_text("messages", "the tokenizer cannot encode these messages", tok.encode, text,
                               add_special_tokens=False)

    def _text_of(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)
            self._token_text[token_id] = text
        return text

    def _completion_logprobs(self, lps: list[TokenLogprob] | None, offset: int) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for lp in lps or []:
            token = self._text_of(lp.token_id)
            out.tokens.append(token)
            out.token_logprobs.append(max(lp.logprob, MIN_LOGPROB))
            out.text_offset.append(offset)
            offset += len(token)
            out.top_logprobs.append({self._text_of(t): max(v, MIN_LOGPROB) for t, v in lp.top} if lp.top else None)
        return out

    def _chat_logprobs(self, lps: list[TokenLogprob] | None) -> ChatLogprobs:
        content = []
        for lp in lps or []:
            token = self._text_of(lp.token_id)
            tops = [TopLogprob(token=self._text_of(t), logprob=max(v, MIN_LOGPROB),
                               bytes=list(self._text_of(t).encode())) for t, v in lp.top]
            content.append(ChatTokenLogprob(token=token, logprob=max(lp.logprob, MIN_LOGPROB),
                                            bytes=list(token.encode()), top_logprobs=tops))
        return ChatLogprobs(content=content)


def _on_client_text(param: str, what: str, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """`fn` (the tokenizer, the chat template) run on text the client chose: whatever it raises is about
    that text, so it is the client's 400, never a 500; it is logged for the operator all the same."""
    try:
        return fn(*args, **kwargs)
    except LoquetierError:
        raise
    except BaseException as e:
        # a panic inside the Rust tokenizer surfaces as pyo3's PanicException, a BaseException
        if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
            raise
        log.warning("%s refused by %s", param, getattr(fn, "__qualname__", fn), exc_info=True)
        raise RequestError(f"{param}: {what} ({type(e).__name__}: {e})", param=param) from None


def _usage(prompt_tokens: int, outs: list[RequestOutput]) -> UsageInfo:
    return UsageInfo.of(prompt_tokens, sum(len(o.token_ids) for o in outs))


def _json(body: Any) -> str:
    import json
    return json.dumps(body)


async def _results_or_disconnect(group: RequestGroup, raw: Request) -> list[RequestOutput] | None:
    """The group's final outputs, or None (with the requests aborted) if the client disconnects first."""
    results = asyncio.ensure_future(group.results())
    gone = asyncio.ensure_future(_wait_disconnect(raw))
    try:
        done, _ = await asyncio.wait({results, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not results.done():
            results.cancel()
            group.close()
    return results.result() if results in done else None


async def _wait_disconnect(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass
