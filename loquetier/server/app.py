"""The HTTP API: `create_app(config)` builds the engine, trainer and store and wires every route.

OpenAI's shapes throughout (models, completions, chat, files, fine-tuning jobs), vLLM's for loading
LoRA adapters at runtime, plus /health and Prometheus /metrics. Every error a client can cause comes
back as `{"error": {"message", "type", "param", "code"}}` with a 4xx status; none stops the engine.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException

from ..engine.engine import Engine
from ..errors import LoquetierError, RequestError
from ..models.sources import resolve_model_source
from ..lora.adapter import load_peft_adapter
from ..training.data import InvalidDatasetError, validate_jsonl
from ..training.trainer import Trainer
from .completions import CompletionService
from .config import ServerConfig
from .engine_loop import TRAINING_SUFFIX, AsyncEngine
from .jobs import JobService, NotFound, fetch_page
from .lifecycle import Lifecycle
from .metrics import ServerMetrics
from .paths import resolve_adapter_path
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    CreateFineTuningJobRequest,
    FileDeleted,
    FileList,
    FineTuningJobCheckpointList,
    FineTuningJobEventList,
    FineTuningJobList,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    UnloadLoRAAdapterRequest,
    error_body,
    lone_surrogate_message,
    validation_error_body,
)
from .store import Store

log = logging.getLogger("loquetier.server")

FINE_TUNE_PURPOSE = "fine-tune"
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error"}


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_response(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, error_type(status), param=param, code=code), status_code=status)


class Forbidden(LoquetierError):
    status = 403
    code = "forbidden"


UPLOAD_FIELDS = ("file", "purpose")


async def refuse_unknown_query_parameters(request: Request) -> None:
    """A query parameter the route does not declare is a 400, as an unknown body field is."""
    route = request.scope.get("route")
    known = {p.alias for p in route.dependant.query_params} if route is not None else set()
    unknown = [k for k in request.query_params if k not in known]
    if unknown:
        raise RequestError(f"unknown query parameter(s) {unknown} for {request.url.path}; "
                           f"it accepts {sorted(known) or 'none'}", param=unknown[0])


def check_upload_form(fields: list[str], filename: str | None) -> None:
    """The multipart fields of POST /v1/files: `file` and `purpose` only, and a filename that is text."""
    if any(f.startswith("expires_after") for f in fields):
        raise RequestError("expires_after is not supported: uploaded files are kept until deleted",
                           param="expires_after")
    unknown = [f for f in fields if f not in UPLOAD_FIELDS]
    if unknown:
        raise RequestError(f"unknown form field(s) {unknown}; an upload has {list(UPLOAD_FIELDS)}", param=unknown[0])
    problem = lone_surrogate_message(filename or "")
    if problem:
        raise RequestError(f"the file name {problem}", param="file")


class Guard:
    """ASGI middleware run before routing: the API key on /v1/*, the request body size limit, and
    while the server drains, 503 for new work (/v1 requests other than GET; the rest are counted)."""

    def __init__(self, app, api_key: str | None, max_body: int, lifecycle: Lifecycle):
        self.app, self.max_body, self.lifecycle = app, max_body, lifecycle
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None and scope["path"].startswith("/v1"):
            if not secrets.compare_digest(headers.get(b"authorization", b""), self.expected):
                resp = error_response(401, "invalid or missing API key: send 'Authorization: Bearer <key>' "
                                           "with the key the server was started with", "invalid_api_key")
                return await resp(scope, receive, send)
        if scope["path"].startswith("/v1") and scope["method"] not in ("GET", "HEAD"):
            if self.lifecycle.draining:
                resp = error_response(503, "the server is shutting down and takes no new work; retry on another "
                                           "replica or after it restarts", "server_shutting_down")
                return await resp(scope, receive, send)
            with self.lifecycle.tracking():
                return await self._limited(scope, receive, send, headers)
        return await self._limited(scope, receive, send, headers)

    async def _limited(self, scope, receive, send, headers: dict) -> None:
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await self._too_large(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise HTTPException(413, f"request body over the limit of {self.max_body} bytes")
            return message

        await self.app(scope, limited_receive, send)

    async def _too_large(self, scope, receive, send) -> None:
        resp = error_response(413, f"request body over the limit of {self.max_body} bytes "
                                   "(raise it with --max-upload-bytes)", "request_too_large")
        await resp(scope, receive, send)


def create_app(config: ServerConfig) -> FastAPI:
    """Load the model, tokenizer and adapters, open the store, and return the FastAPI app.
    The engine thread starts (and interrupted jobs resume) when the app starts serving."""
    source = resolve_model_source(config.model, config.revision)
    tokenizer = source.load_tokenizer()
    engine = Engine(config.engine_config(), tokenizer, source)
    trainer = Trainer(engine)
    base = config.model_name
    for name, path in config.adapters.items():
        if name == base:
            raise RequestError(f"adapter name {name!r} is the base model's name; pick another")
        engine.load_adapter(name, path)
    store = Store(config.data_dir)
    metrics = ServerMetrics()
    aengine = AsyncEngine(engine, trainer)
    jobs = JobService(config, store, aengine, trainer, metrics)
    completions = CompletionService(aengine, tokenizer, base)
    lifecycle = Lifecycle(aengine, jobs)
    engine.stats.listeners.append(lambda st: metrics.observe_request(
        st.adapter or base, st.ttft, st.tpot, st.e2e or 0.0, st.queue_delay, st.finish_reason or "unknown",
        st.prompt_tokens, st.output_tokens))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        aengine.start(asyncio.get_running_loop())
        await aengine.call(jobs.restore)
        log.info("serving %s on the engine thread; data in %s", base, config.data_dir)
        yield
        await asyncio.to_thread(aengine.stop)
        store.close()

    app = FastAPI(title="Loquetier", version="0.1.0", lifespan=lifespan)
    app.state.config, app.state.engine, app.state.aengine = config, engine, aengine
    app.state.store, app.state.jobs, app.state.metrics = store, jobs, metrics
    app.state.lifecycle = lifecycle
    app.add_middleware(Guard, api_key=config.api_key, max_body=config.max_upload_bytes + (1 << 20),
                       lifecycle=lifecycle)
    _add_error_handlers(app)

    # ------------------------------------------------------------------ health and metrics
    def engine_snapshot() -> dict:
        kv = engine.kv
        resident = sum(owner is not None for owner in engine.adapters.slot_owner)
        return {"num_requests_running": len(engine.scheduler.running),
                "num_requests_waiting": len(engine.scheduler.waiting),
                "kv_blocks_used": kv.num_blocks - kv.allocator.num_free, "kv_blocks_total": kv.num_blocks,
                "kv_cache_usage": kv.usage, "adapters_gpu": resident,
                "adapters_cpu": len(engine.adapters.names()) - resident,
                "training_jobs_active": sum(j.active for j in trainer.jobs.values()),
                "steps": engine.stats.steps,
                "prefix_cache_queries": engine.stats.prefix_cache.queries,
                "prefix_cache_hits": engine.stats.prefix_cache.hits}

    @app.get("/health")
    async def health():
        if aengine.fatal is not None:
            return error_response(503, f"the engine stopped on an unrecoverable error: {aengine.fatal}", "engine_dead")
        if lifecycle.draining or not aengine.alive:
            return error_response(503, "the server is shutting down", "server_shutting_down")
        return {"status": "ok", "model": base, **await aengine.call(engine_snapshot)}

    @app.get("/metrics")
    async def prometheus():
        snap = await aengine.call(engine_snapshot)
        metrics.set_engine_gauges(snap["num_requests_running"], snap["num_requests_waiting"],
                                  snap["kv_cache_usage"], snap["adapters_gpu"], snap["adapters_cpu"])
        metrics.set_prefix_cache(snap["prefix_cache_queries"], snap["prefix_cache_hits"])
        attained = engine.stats.slo_attainment()
        if attained is not None:
            metrics.set_slo_attainment(attained)
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(refuse_unknown_query_parameters)])

    # ------------------------------------------------------------------ models and adapters
    def model_cards() -> list[ModelCard]:
        cards = [ModelCard(id=base, root=config.model, max_model_len=engine.max_model_len)]
        for name in engine.adapter_names():
            if name.endswith(TRAINING_SUFFIX):
                continue
            rec = engine.adapters.records.get(name)
            path, parent = engine.adapter_paths.get(name, (None, None))
            if rec is not None:
                parent, path = rec.parent, rec.source or path
            cards.append(ModelCard(id=name, root=str(path) if path else None, parent=parent or base,
                                   max_model_len=engine.max_model_len))
        return cards

    @v1.get("/models")
    async def list_models():
        return ModelList(data=await aengine.call(model_cards))

    @v1.get("/models/{model_id:path}")
    async def get_model(model_id: str):
        for card in await aengine.call(model_cards):
            if card.id == model_id:
                return card
        raise NotFound(f"model {model_id!r} does not exist")

    @v1.post("/load_lora_adapter")
    async def load_lora_adapter(req: LoadLoRAAdapterRequest):
        if not config.enable_lora_loading:
            raise Forbidden("loading adapters at runtime is disabled; start the server with --enable-lora-loading "
                            "and --lora-root DIR")
        if req.lora_name == base or req.lora_name.endswith(TRAINING_SUFFIX):
            raise RequestError(f"{req.lora_name!r} cannot be an adapter name; pick another")
        path = resolve_adapter_path(req.lora_path, [Path(r) for r in config.lora_roots])
        weights = await asyncio.to_thread(load_peft_adapter, path, engine.args, config.max_lora_rank)
        await aengine.call(engine.add_adapter, req.lora_name, weights, None, path)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @v1.post("/unload_lora_adapter")
    async def unload_lora_adapter(req: UnloadLoRAAdapterRequest):
        if not config.enable_lora_loading:
            raise Forbidden("unloading adapters at runtime is disabled; start the server with --enable-lora-loading")
        if req.lora_name == base:
            raise RequestError("the base model cannot be unloaded")

        def unload() -> None:
            if not engine.has_adapter(req.lora_name):
                raise NotFound(f"no adapter named {req.lora_name!r} is loaded")
            engine.unload_adapter(req.lora_name)
        await aengine.call(unload)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    # ------------------------------------------------------------------ generation
    @v1.post("/completions")
    async def create_completion(req: CompletionRequest, raw: Request):
        return await completions.complete(req, raw)

    @v1.post("/chat/completions")
    async def create_chat_completion(req: ChatCompletionRequest, raw: Request):
        return await completions.chat(req, raw)

    # ------------------------------------------------------------------ files
    @v1.post("/files")
    async def upload_file(raw: Request, file: UploadFile = File(...), purpose: str = Form(...)):
        check_upload_form(list((await raw.form()).keys()), file.filename)
        if purpose != FINE_TUNE_PURPOSE:
            raise RequestError(f"purpose {purpose!r} is not supported; upload training data with purpose "
                               f"'{FINE_TUNE_PURPOSE}'")
        content = await file.read()
        if len(content) > config.max_upload_bytes:
            raise HTTPException(413, f"{file.filename} is {len(content)} bytes, over the upload limit of "
                                     f"{config.max_upload_bytes} bytes")
        name = file.filename or "upload.jsonl"
        problems = await asyncio.to_thread(validate_jsonl, content)
        if problems:
            raise InvalidDatasetError(problems, name)
        record = await asyncio.to_thread(store.create_file, name, purpose, content)
        return record.to_api()

    @v1.get("/files")
    async def list_files(purpose: str | None = None, after: str | None = None,
                         limit: int = Query(10_000, ge=1, le=10_000), order: str = Query("desc", pattern="^(asc|desc)$")):
        page = fetch_page(lambda: store.list_files(after=after, limit=limit, purpose=purpose, order=order))
        data = [f.to_api() for f in page.items]
        return FileList(data=data, has_more=page.has_more, first_id=data[0].id if data else None,
                        last_id=data[-1].id if data else None)

    def file_record(file_id: str):
        record = store.get_file(file_id)
        if record is None:
            raise NotFound(f"no file with id {file_id!r}")
        return record

    @v1.get("/files/{file_id}")
    async def get_file(file_id: str):
        return file_record(file_id).to_api()

    @v1.get("/files/{file_id}/content")
    async def get_file_content(file_id: str):
        return Response(await asyncio.to_thread(file_record(file_id).path.read_bytes),
                        media_type="application/octet-stream")

    @v1.delete("/files/{file_id}")
    async def delete_file(file_id: str):
        file_record(file_id)
        store.delete_file(file_id)
        return FileDeleted(id=file_id)

    # ------------------------------------------------------------------ fine-tuning jobs
    @v1.post("/fine_tuning/jobs")
    async def create_job(req: CreateFineTuningJobRequest):
        return (await jobs.create(req)).to_api()

    @v1.get("/fine_tuning/jobs")
    async def list_jobs(after: str | None = None, limit: int = Query(20, ge=1, le=100)):
        page = jobs.list(after, limit)
        return FineTuningJobList(data=[j.to_api() for j in page.items], has_more=page.has_more)

    @v1.get("/fine_tuning/jobs/{job_id}")
    async def get_job(job_id: str):
        return jobs.get(job_id).to_api()

    @v1.post("/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str):
        return (await jobs.cancel(job_id)).to_api()

    @v1.post("/fine_tuning/jobs/{job_id}/pause")
    async def pause_job(job_id: str):
        return (await jobs.pause(job_id)).to_api()

    @v1.post("/fine_tuning/jobs/{job_id}/resume")
    async def resume_job(job_id: str):
        return (await jobs.resume(job_id)).to_api()

    @v1.get("/fine_tuning/jobs/{job_id}/events")
    async def list_job_events(job_id: str, after: str | None = None, limit: int = Query(20, ge=1, le=1000)):
        page = jobs.events(job_id, after, limit)
        return FineTuningJobEventList(data=[e.to_api() for e in page.items], has_more=page.has_more)

    @v1.get("/fine_tuning/jobs/{job_id}/checkpoints")
    async def list_job_checkpoints(job_id: str, after: str | None = None, limit: int = Query(10, ge=1, le=1000)):
        page = jobs.checkpoints(job_id, after, limit)
        data = [c.to_api() for c in page.items]
        return FineTuningJobCheckpointList(data=data, has_more=page.has_more,
                                           first_id=data[0].id if data else None,
                                           last_id=data[-1].id if data else None)

    app.include_router(v1)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LoquetierError)
    async def loquetier_error(request: Request, exc: LoquetierError):
        status = getattr(exc, "status", 400)
        if status >= 500:
            log.error("request failed: %s", exc)
        return error_response(status, str(exc), getattr(exc, "code", None), getattr(exc, "param", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
        if bad_json is not None:
            detail = (bad_json.get("ctx") or {}).get("error", "")
            return error_response(400, f"the request body is not valid JSON ({detail or 'decode error'})",
                                  "invalid_json")
        return JSONResponse(validation_error_body(errors), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        message = str(exc.detail)
        if exc.status_code in (404, 405) and exc.detail in ("Not Found", "Method Not Allowed"):
            message = f"{request.method} {request.url.path}: no such route on this server ({exc.detail})"
        code = {413: "request_too_large", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, str(message), code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")
