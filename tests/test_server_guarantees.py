"""Guarantees of the HTTP surface checked route by route on the app in-process (docs/GUARANTEES.md):
the API key guards every /v1 route, runtime adapter loading is off unless enabled, request bodies
are bounded however they are sent, unknown routes get OpenAI errors, and nothing is unpickled."""

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers import assert_error, write_model_with_tokenizer

import loquetier
from loquetier.server.app import create_app
from loquetier.server.config import ServerConfig

KEY = "sk-guarantees"
UPLOAD_LIMIT = 1000
BODY_LIMIT = UPLOAD_LIMIT + (1 << 20)   # uploads are multipart: the Guard allows 1 MiB of framing


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("guarantees")
    write_model_with_tokenizer(root / "model", "llama")
    app = create_app(ServerConfig(model=str(root / "model"), served_model_name="tiny", api_key=KEY,
                                  data_dir=str(root / "data"), num_kv_blocks=32, max_upload_bytes=UPLOAD_LIMIT))
    with TestClient(app) as http:
        yield app, http


def test_every_v1_route_needs_the_api_key(app):
    app, http = app
    v1 = [(method.upper(), path) for path, ops in app.openapi()["paths"].items() if path.startswith("/v1")
          for method in ops]
    assert {("POST", "/v1/completions"), ("POST", "/v1/load_lora_adapter"), ("GET", "/v1/files/{file_id}/content"),
            ("POST", "/v1/fine_tuning/jobs/{job_id}/cancel")} <= set(v1) and len(v1) >= 19, v1
    for method, path in v1:
        url = re.sub(r"\{[^}]+\}", "x", path)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            assert_error(http.request(method, url, headers=headers), 401, "API key")
    ok = {"Authorization": f"Bearer {KEY}"}
    assert http.get("/v1/models", headers=ok).status_code == 200
    # as vLLM's: probes and scrapes need no key
    assert http.get("/health").status_code == 200 and http.get("/metrics").status_code == 200


def test_runtime_adapter_loading_is_off_unless_enabled(app):
    _, http = app
    ok = {"Authorization": f"Bearer {KEY}"}
    r = http.post("/v1/load_lora_adapter", headers=ok, json={"lora_name": "x", "lora_path": "/etc"})
    assert assert_error(r, 403, "--enable-lora-loading")["code"] == "forbidden"
    assert_error(http.post("/v1/unload_lora_adapter", headers=ok, json={"lora_name": "x"}), 403)


def test_request_bodies_are_bounded_however_they_are_sent(app):
    _, http = app
    ok = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    big = b'{"model": "tiny", "prompt": "' + b"a" * BODY_LIMIT + b'"}'
    assert_error(http.post("/v1/completions", headers=ok, content=big), 413, "limit")

    def chunks():   # no Content-Length: the limit is enforced while the body streams in
        yield big[:1000]
        for i in range(1000, len(big), 64 << 10):
            yield big[i:i + (64 << 10)]

    assert_error(http.post("/v1/completions", headers=ok, content=chunks()), 413, "limit")
    upload = http.post("/v1/files", headers={"Authorization": f"Bearer {KEY}"}, data={"purpose": "fine-tune"},
                       files={"file": ("big.jsonl", b'{"text": "a"}\n' * 200)})
    assert_error(upload, 413, "upload limit")
    assert http.get("/health").json()["status"] == "ok"


def test_unknown_routes_and_methods_get_openai_errors(app):
    _, http = app
    ok = {"Authorization": f"Bearer {KEY}"}
    assert assert_error(http.get("/v1/nope", headers=ok), 404, "no such route")["code"] == "not_found"
    assert assert_error(http.delete("/v1/completions", headers=ok), 405)["code"] == "method_not_allowed"


def test_the_package_never_unpickles():
    """Weights, checkpoints and optimizer state are safetensors + JSON; no code path unpickles."""
    unsafe = re.compile(r"\bimport pickle\b|\bpickle\.loads?\(|\btorch\.load\((?![^)]*weights_only=True)|"
                        r"\bnp\.load\([^)]*allow_pickle=True|\bdill\b|\bjoblib\.load\(")
    offenders = [f"{path}:{n}: {line.strip()}" for path in Path(loquetier.__file__).parent.rglob("*.py")
                 for n, line in enumerate(path.read_text().splitlines(), 1) if unsafe.search(line)]
    assert offenders == []


def test_every_test_the_guarantee_table_cites_exists():
    table = Path(__file__).parent.parent / "docs" / "GUARANTEES.md"
    cited = []
    for line in table.read_text().splitlines():
        if not line.startswith("| ") or line.startswith("| Promise"):
            continue
        test_cell = line.split(" | ")[1]
        current = None
        for ref in re.findall(r"`([^`]+)`", test_cell):
            file, _, name = ref.rpartition("::")
            current = file or current
            cited.append((current, name.split("[")[0]))
    assert len(cited) >= 30
    tests = Path(__file__).parent
    missing = [f"{f}::{n}" for f, n in cited if f"def {n}(" not in (tests / f).read_text()]
    assert missing == []
