"""The SQLite store: persistence across reopen, pagination, event order, atomic files, threads."""

import io
import sqlite3
import threading

import pytest

from loquetier.server.protocol import FineTuningJobError, Hyperparameters, LoraParams
from loquetier.server.store import (
    SCHEMA_VERSION,
    RecordNotFound,
    SchemaVersionError,
    Store,
)


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "data") as s:
        yield s


def _job(store: Store, **kw):
    return store.create_job("base", "file-x", Hyperparameters(n_epochs=2), **kw)


def test_files_roundtrip_and_delete(store):
    rec = store.create_file("train.jsonl", "fine-tune", b'{"prompt": "a"}\n')
    assert rec.id.startswith("file-") and rec.bytes == 16 and rec.path.parent == store.files_dir
    assert store.read_file(rec.id) == b'{"prompt": "a"}\n'
    api = store.get_file(rec.id).to_api()
    assert (api.object, api.filename, api.purpose, api.bytes) == ("file", "train.jsonl", "fine-tune", 16)
    streamed = store.create_file("big.jsonl", "fine-tune", io.BytesIO(b"x" * 3_000_000))
    assert streamed.bytes == 3_000_000
    assert store.delete_file(rec.id) and not rec.path.exists() and store.get_file(rec.id) is None
    assert not store.delete_file(rec.id)
    with pytest.raises(RecordNotFound):
        store.read_file(rec.id)


def test_file_writes_are_atomic(store):
    """A failing upload leaves neither a row nor a final or temporary file behind."""

    class Broken(io.RawIOBase):
        def readinto(self, b):
            raise OSError("client went away")

    with pytest.raises(OSError):
        store.create_file("bad.jsonl", "fine-tune", Broken())
    assert list(store.files_dir.iterdir()) == []
    assert store.list_files().items == []
    rec = store.create_file("ok.jsonl", "fine-tune", b"abc")
    assert [p.name for p in store.files_dir.iterdir()] == [rec.id]  # no temp file left after the rename


def test_files_pagination_and_purpose(store):
    ids = [store.create_file(f"f{i}", "fine-tune" if i % 2 == 0 else "batch", b"x").id for i in range(5)]
    first = store.list_files(limit=2)
    assert [f.id for f in first.items] == ids[::-1][:2] and first.has_more
    second = store.list_files(after=first.items[-1].id, limit=2)
    assert [f.id for f in second.items] == ids[::-1][2:4] and second.has_more
    last = store.list_files(after=second.items[-1].id, limit=2)
    assert [f.id for f in last.items] == [ids[0]] and not last.has_more
    assert [f.id for f in store.list_files(order="asc", limit=10).items] == ids
    assert [f.id for f in store.list_files(purpose="fine-tune").items] == [ids[4], ids[2], ids[0]]
    with pytest.raises(RecordNotFound):
        store.list_files(after="file-nope")
    with pytest.raises(ValueError):
        store.list_files(limit=0)


def test_job_lifecycle(store):
    job = _job(store, lora=LoraParams(r=4), seed=1, suffix="s", spec_json='{"lr": 1e-4}', checkpoint_dir="/c")
    assert job.id.startswith("ftjob-") and job.status == "queued" and job.finished_at is None
    got = store.get_job(job.id)
    assert got == job and got.lora.r == 4 and got.hyperparameters.n_epochs == 2
    store.update_job_status(job.id, "running")
    store.update_job(job.id, trained_tokens=123, fine_tuned_model="base:s")
    err = FineTuningJobError(code="oom", message="out of memory")
    done = store.update_job_status(job.id, "failed", error=err)
    assert done.status == "failed" and done.error == err and done.finished_at is not None
    api = done.to_api()
    assert api.object == "fine_tuning.job" and api.trained_tokens == 123 and api.error.code == "oom"
    assert api.lora.r == 4 and api.hyperparameters.n_epochs == 2
    with pytest.raises(RecordNotFound):
        store.update_job_status("ftjob-nope", "running")
    with pytest.raises(ValueError, match="unknown job status"):
        store.update_job_status(job.id, "exploded")


def test_jobs_list_and_resume(store):
    jobs = [_job(store) for _ in range(4)]
    store.update_job_status(jobs[0].id, "running")
    store.update_job_status(jobs[1].id, "succeeded")
    store.update_job_status(jobs[2].id, "paused")
    assert [j.id for j in store.jobs_to_resume()] == [jobs[0].id, jobs[3].id]
    page = store.list_jobs(limit=3)
    assert [j.id for j in page.items] == [j.id for j in jobs[::-1][:3]] and page.has_more
    assert [j.id for j in store.list_jobs(after=page.items[-1].id).items] == [jobs[0].id]


def test_events_are_ordered_and_paginated(store):
    job = _job(store)
    other = _job(store)
    events = [store.add_event(job.id, f"step {i}", type="metrics", data={"step": i}) for i in range(5)]
    store.add_event(other.id, "unrelated")
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    assert len({e.id for e in events}) == 5 and all(e.id.startswith("ftevent-") for e in events)
    newest = store.list_events(job.id, limit=2)
    assert [e.message for e in newest.items] == ["step 4", "step 3"] and newest.has_more
    tail = store.list_events(job.id, after=events[1].id, order="asc", limit=100)
    assert [e.data["step"] for e in tail.items] == [2, 3, 4] and not tail.has_more
    assert tail.items[0].to_api().object == "fine_tuning.job.event"


def test_checkpoints(store):
    job = _job(store)
    for step in (10, 20, 30):
        store.add_checkpoint(job.id, step, f"mine:step-{step}", f"/ckpt/{step}", {"train_loss": 1.0 / step})
    page = store.list_checkpoints(job.id, limit=2)
    assert [c.step for c in page.items] == [30, 20] and page.has_more
    api = page.items[0].to_api()
    assert api.fine_tuned_model_checkpoint == "mine:step-30" and api.step_number == 30
    assert api.id.startswith("ftckpt-") and api.fine_tuning_job_id == job.id
    assert api.metrics.train_loss == pytest.approx(1 / 30)


def test_persists_across_reopen(tmp_path):
    with Store(tmp_path) as s:
        f = s.create_file("a.jsonl", "fine-tune", b"hello")
        job = _job(s, lora=LoraParams(r=2))
        s.update_job_status(job.id, "running")
        s.add_event(job.id, "started")
        s.add_checkpoint(job.id, 5, "a:step-5", "/x/5", {"train_loss": 0.5})
    with Store(tmp_path) as s:
        assert s.read_file(f.id) == b"hello"
        assert [j.id for j in s.jobs_to_resume()] == [job.id]
        assert s.get_job(job.id).lora.r == 2
        assert [e.message for e in s.list_events(job.id).items] == ["started"]
        assert s.list_checkpoints(job.id).items[0].path.as_posix() == "/x/5"
        later = s.add_event(job.id, "resumed")
        assert later.seq > s.list_events(job.id, order="asc").items[0].seq
    conn = sqlite3.connect(tmp_path / "loquetier.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(SchemaVersionError, match="newer"):
        Store(tmp_path)


def test_concurrent_threads(store):
    job = _job(store)
    errors = []

    def work(k: int) -> None:
        try:
            for i in range(25):
                store.add_event(job.id, f"t{k}-{i}")
                store.create_file(f"t{k}-{i}", "fine-tune", b"z" * i)
                store.update_job(job.id, trained_tokens=i)
                store.list_files(limit=5)
        except Exception as e:  # surfaced below: threads swallow exceptions
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    events = store.list_events(job.id, limit=1000, order="asc").items
    assert len(events) == 200 and [e.seq for e in events] == sorted(e.seq for e in events)
    assert len(store.list_files(limit=1000).items) == 200
    for k in range(8):  # each thread's events stay in the order it wrote them
        mine = [int(e.message.split("-")[1]) for e in events if e.message.startswith(f"t{k}-")]
        assert mine == list(range(25))
