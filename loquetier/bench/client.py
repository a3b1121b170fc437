"""One streamed request to an OpenAI-compatible server, timed chunk by chunk (httpx, no SDK).

The outcome is one of: completed (the stream ended with `[DONE]`), cancelled (the client closed
the stream on purpose), rejected (an HTTP 4xx with an error body: the server refused it clearly)
or failed (5xx, an error event inside the stream, a broken connection, a malformed stream).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from .workload import RequestSpec

COMPLETED, CANCELLED, REJECTED, FAILED = "completed", "cancelled", "rejected", "failed"


@dataclass
class RequestResult:
    """What one request did, with its timings (seconds, on the client's monotonic clock)."""

    index: int
    model: str
    outcome: str
    input_len: int
    output_tokens: int = 0          # from the usage chunk when the server sends one, else token chunks
    ttft: float | None = None       # send -> first chunk carrying text
    e2e: float | None = None        # send -> end of the stream
    itl: list[float] = field(default_factory=list)   # gaps between text-carrying chunks
    status: int | None = None       # HTTP status
    error: str | None = None        # the server's error message (or the client's exception)
    error_code: str | None = None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def request_body(spec: RequestSpec, chat: bool, ignore_eos: bool) -> dict:
    body: dict = {"model": spec.model, "max_tokens": spec.output_len, "temperature": 0.0, "stream": True,
                  "stream_options": {"include_usage": True}}
    if ignore_eos:   # vLLM's extension (and ours): generate exactly max_tokens tokens
        body["ignore_eos"] = True
    if chat:
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    return body


def _error_of(payload: object) -> tuple[str | None, str | None]:
    """(message, code) of an OpenAI error body, or (None, None) when it is not one."""
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        err = payload["error"]
        return str(err.get("message")), (str(err["code"]) if err.get("code") is not None else None)
    return None, None


def _chunk_text(payload: dict, chat: bool) -> str:
    choices = payload.get("choices") or []
    if not choices:
        return ""
    if chat:
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


async def send(http: httpx.AsyncClient, url: str, spec: RequestSpec, chat: bool, ignore_eos: bool) -> RequestResult:
    """Send `spec` as a streamed request to `url` and time it."""
    result = RequestResult(spec.index, spec.model, FAILED, spec.input_len)
    chunks = 0
    start = last = time.perf_counter()
    try:
        async with http.stream("POST", url, json=request_body(spec, chat, ignore_eos)) as resp:
            result.status = resp.status_code
            if resp.status_code != 200:
                raw = await resp.aread()
                try:
                    result.error, result.error_code = _error_of(json.loads(raw))
                except ValueError:
                    pass
                if result.error is None:
                    result.error = raw.decode(errors="replace")[:300] or f"HTTP {resp.status_code}"
                elif 400 <= resp.status_code < 500:
                    result.outcome = REJECTED
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    result.outcome, result.e2e = COMPLETED, time.perf_counter() - start
                    break
                payload = json.loads(data)
                message, code = _error_of(payload)
                if message is not None:   # the server ended the stream with an error
                    result.error, result.error_code = message, code
                    return result
                if payload.get("usage"):
                    result.output_tokens = int(payload["usage"].get("completion_tokens") or 0)
                if _chunk_text(payload, chat):
                    now = time.perf_counter()
                    if result.ttft is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
                    if spec.cancel_after is not None and chunks >= spec.cancel_after:
                        result.outcome, result.output_tokens = CANCELLED, chunks
                        return result   # leaving the block closes the connection: a client disconnect
            else:
                result.error = "the stream ended without [DONE]"
    except (httpx.HTTPError, ValueError) as e:   # connection trouble, timeouts, malformed JSON
        result.error = f"{type(e).__name__}: {e}"
        return result
    if result.outcome == COMPLETED and not result.output_tokens:
        result.output_tokens = chunks   # a server that sends no usage chunk: one token per chunk
    return result
