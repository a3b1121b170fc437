"""Prometheus metrics: names in the exposition text, and one registry per server."""

from prometheus_client.parser import text_string_to_metric_families

from loquetier.server.metrics import ServerMetrics


def _samples(metrics: ServerMetrics) -> dict:
    body, _ = metrics.render()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


def test_render_contains_every_metric():
    m = ServerMetrics()
    m.observe_request("base:a", ttft=0.05, tpot=0.01, e2e=0.5, queue=0.002, finished_reason="stop",
                      prompt_tokens=10, completion_tokens=20)
    m.observe_request("base", ttft=None, tpot=None, e2e=0.1, queue=None, finished_reason="abort")
    m.set_engine_gauges(running=3, waiting=7, kv_usage=0.25, adapters_gpu=2, adapters_cpu=5)
    m.set_job("ftjob-1", tokens_per_s=1234.5, loss=1.75)
    m.set_slo_attainment(0.9)
    body, content_type = m.render()
    assert content_type.startswith("text/plain")
    text = body.decode()
    for name in ("loquetier_requests_total", "loquetier_prompt_tokens_total", "loquetier_generation_tokens_total",
                 "loquetier_time_to_first_token_seconds_bucket", "loquetier_time_per_output_token_seconds_bucket",
                 "loquetier_e2e_request_latency_seconds_bucket", "loquetier_request_queue_time_seconds_bucket",
                 "loquetier_num_requests_running", "loquetier_num_requests_waiting",
                 "loquetier_kv_cache_usage_ratio", "loquetier_lora_adapters_loaded",
                 "loquetier_training_tokens_per_second", "loquetier_training_loss",
                 "loquetier_slo_attainment_ratio"):
        assert name in text, name
    s = _samples(m)
    assert s[("loquetier_requests_total", (("finished_reason", "stop"), ("model", "base:a")))] == 1
    assert s[("loquetier_num_requests_waiting", ())] == 7
    assert s[("loquetier_lora_adapters_loaded", (("device", "cpu"),))] == 5
    assert s[("loquetier_training_loss", (("job_id", "ftjob-1"),))] == 1.75
    assert s[("loquetier_time_to_first_token_seconds_count", (("model", "base:a"),))] == 1
    assert ("loquetier_time_to_first_token_seconds_count", (("model", "base"),)) not in s  # None skipped


def test_registries_are_independent_and_jobs_removable():
    a, b = ServerMetrics(), ServerMetrics()  # would raise "Duplicated timeseries" on a shared registry
    a.set_job("ftjob-1", 10.0, None)
    assert ("loquetier_training_tokens_per_second", (("job_id", "ftjob-1"),)) in _samples(a)
    assert ("loquetier_training_tokens_per_second", (("job_id", "ftjob-1"),)) not in _samples(b)
    a.remove_job("ftjob-1")
    a.remove_job("ftjob-never")
    assert ("loquetier_training_tokens_per_second", (("job_id", "ftjob-1"),)) not in _samples(a)


def test_prefix_cache_counters_follow_the_engine_totals():
    m = ServerMetrics()
    m.set_prefix_cache(queries=100, hits=0)
    m.set_prefix_cache(queries=250, hits=96)
    m.set_prefix_cache(queries=250, hits=96)   # a scrape with nothing new
    s = _samples(m)
    assert s[("loquetier_prefix_cache_queries_total", ())] == 250
    assert s[("loquetier_prefix_cache_hits_total", ())] == 96
