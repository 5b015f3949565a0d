"""The load generator's mixed-duration workload: parsed strictly, and replayed identically for every policy; repeated
runs pooled into medians and paired wins."""
import pytest

from benchmarks.load import parse_seconds, pool, request_duration, write_report


def test_audio_seconds_is_a_number_or_a_range():
    assert parse_seconds("5") == (5.0, 5.0)
    assert parse_seconds("1-10") == (1.0, 10.0)
    for bad in ("0", "10-1", "-3", "a-b"):
        with pytest.raises(ValueError):
            parse_seconds(bad)


def test_request_durations_replay_and_cover_the_range():
    fixed = [request_duration((5.0, 5.0), 3, i) for i in range(20)]
    assert fixed == [5.0] * 20
    first = [request_duration((1.0, 10.0), 3, i) for i in range(200)]
    assert first == [request_duration((1.0, 10.0), 3, i) for i in range(200)]  # every policy sees the same requests
    assert first != [request_duration((1.0, 10.0), 4, i) for i in range(200)]
    assert all(1.0 <= d <= 10.0 for d in first) and min(first) < 2.0 and max(first) > 9.0


def _row(goodput: float, p99: float | None, ok: int = 10, peak: float = 900.0) -> dict:
    return {"offered_rps": 4.0, "sent": 10, "ok": ok, "statuses": {"200": ok, "429": 10 - ok},
            "throughput_rps": goodput + 0.5, "goodput_rps": goodput, "p50_s": 0.5, "p95_s": 0.9, "p99_s": p99,
            "rss_peak_mib": peak, "rss_mean_mib": 800.0, "rss_series_mib": [(0.0, 800.0)]}


def test_repeated_runs_pool_into_medians_and_paired_wins(tmp_path):
    runs = [_row(3.0, 1.0, peak=900), _row(1.0, 4.0, ok=7, peak=1000), _row(2.0, 2.0, peak=950)]
    pooled = pool(runs)
    assert (pooled["goodput_rps"], pooled["p99_s"], pooled["throughput_rps"]) == (2.0, 2.0, 2.5)
    assert (pooled["sent"], pooled["ok"], pooled["statuses"]) == (30, 27, {"200": 27, "429": 3})
    assert pooled["rss_peak_mib"] == 1000 and "rss_series_mib" not in pooled
    assert [r["goodput_rps"] for r in pooled["runs"]] == [3.0, 1.0, 2.0]
    assert pool(runs[:1]) is runs[0]
    other = pool([_row(3.5, 0.8), _row(0.5, None, ok=0), _row(2.5, 1.9)])
    report = {"config": {"model": "m", "audio_seconds": "5", "steps": None, "seconds": 30, "slo": 1.0,
                         "max_batch": 16, "rss_interval_s": 0.5, "rss_target_mib": 1536, "repeats": 3},
              "environment": {"platform": "p", "cpu_count": 2, "cuda": None, "torch": "t", "python": "3",
                              "date": "d", "command": "c"},
              "policies": {"continuous": [pooled], "adaptive": [other]}, "servers": {}}
    md = write_report(report, tmp_path, "load-test")[1].read_text()
    assert "| continuous | 4 | 3.00, 1.00, 2.00 | 1.00, 4.00, 2.00 |" in md
    # adaptive against continuous, run by run: goodput 3.5 > 3, 0.5 < 1, 2.5 > 2; p99 0.8 < 1, none, 1.9 < 2
    assert "| adaptive | 4 | 2/3 | 2/3 |" in md


def test_soak_summary_reads_growth_after_five_minutes_and_counts_answers():
    import random

    from benchmarks.soak import prompt, summary

    windows = [{"t_s": t, "rss_mib": m, "statuses": {"200": 3, "429": 1 if t > 600 else 0}}
               for t, m in ((10, 900.0), (290, 1000.0), (300, 1100.0), (900, 1150.0), (1800, 1155.0))]
    s = summary(windows, idle_mib=880.0, peak_mib=1200.0)
    assert s["rss_after_5_min_mib"] == 1100.0 and s["rss_end_mib"] == 1155.0
    assert s["growth_after_5_min"] == 0.05 and s["statuses"] == {"200": 15, "429": 2} and s["answered"] == 17
    rng = random.Random(0)
    prompts = {prompt(rng, i) for i in range(50)}
    assert len(prompts) == 50 and all(len(p) <= 500 for p in prompts)  # unique, within the API's limit


def test_poisson_runs_through_the_client_and_count_statuses_and_replicas(server):
    """``deploy.ray.bench``'s Poisson mode against one real server: every arrival answered, latencies of the 200s,
    statuses counted (the unknown model's 404s too), no replica header on a single process."""
    from benchmarks.load import arrival_times
    from deploy.ray.bench import poisson

    body = {"prompt": "rain", "model": "tiny", "duration": 1.0, "steps": 2}
    r = poisson(server.url, body, rate=20, seconds=1.0, seed=3)
    assert r["sent"] == len(arrival_times(20, 1.0, 3)) == r["ok"] == r["statuses"]["200"] > 5
    assert 0 < r["p50_s"] <= r["p99_s"] and r["per_replica"] == {"-": r["ok"]}
    bad = poisson(server.url, dict(body, model="nope"), rate=20, seconds=0.5, seed=3)
    assert bad["ok"] == 0 and bad["statuses"] == {"404": bad["sent"]} and bad["p99_s"] is None


def test_a_warm_up_sends_unmeasured_load_and_counts_what_the_server_captured(server):
    from argparse import Namespace

    from benchmarks.load import arrival_times, captured_between, warm_up

    args = Namespace(warmup_seconds=0.5, seed=4, timeout=30.0, slo=2.0)
    w = warm_up(server.url, 10.0, args, {"model": "tiny", "steps": 2}, (1.0, 1.0))
    assert w["sent"] == len(arrival_times(10.0, 0.5, 3)) == w["ok"] > 0  # its own seed: the run's minus one
    assert w["graph_captures"] == {} and (w["seconds"], w["rate"]) == (0.5, 10.0)  # no CUDA graphs on a CPU
    assert captured_between({"tick": 2}, {"tick": 5, "whole": 1, "forward": 0}) == {"tick": 3, "whole": 1}
    assert captured_between(None, {"tick": 1}) is None


def test_graph_captures_are_read_from_the_servers_metrics():
    from prometheus_client import generate_latest

    from benchmarks.load import captures_in
    from service.metrics import Metrics

    m = Metrics()
    m.graph_captures.labels("tta-arc", "tick").inc(3)
    m.graph_captures.labels("tta-bsa-25", "tick").inc(1)
    m.graph_captures.labels("tta-arc", "whole").inc(2)
    assert captures_in(generate_latest(m.registry).decode()) == {"tick": 4, "whole": 2}
    assert captures_in(generate_latest(Metrics().registry).decode()) == {}


def test_a_server_the_benchmarks_start_sees_the_packages_they_were_given(monkeypatch):
    """On a remote GPU machine the web packages come from a PYTHONPATH of their own (benchmarks/gpu_suite.sh): the
    servers that benchmarks.load and benchmarks.soak start keep it, behind the repository."""
    from pathlib import Path

    from benchmarks.common import child_pythonpath, git_commit

    root = str(Path(__file__).resolve().parents[1])
    monkeypatch.delenv("PYTHONPATH", raising=False)
    assert child_pythonpath() == root
    monkeypatch.setenv("PYTHONPATH", "/tmp/site")
    assert child_pythonpath() == f"{root}:/tmp/site"
    monkeypatch.setenv("GIT_COMMIT", "abc1234")
    assert git_commit() == "abc1234"


def test_a_load_run_stopped_midway_writes_the_rates_it_measured(server, tmp_path, monkeypatch):
    """A stop (SIGTERM at the suite's time limit, turned into SystemExit(143)) during the second rate leaves the first
    rate's figures written, and the report says which run was cut off and which never ran."""
    import json

    from benchmarks import load

    real, calls = load.run_one_rate, []

    def stopped_at_the_second(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 2:
            raise SystemExit(143)  # what benchmarks.common.stop_on_sigterm makes of the signal
        return real(*args, **kwargs)

    monkeypatch.setattr(load, "run_one_rate", stopped_at_the_second)
    monkeypatch.setattr(load, "stop_on_sigterm", lambda: None)  # this process is pytest's: no handler installed
    with pytest.raises(SystemExit) as stop:
        load.main(["--url", server.url, "--model", "tiny", "--rates", "4,8,16", "--seconds", "0.5", "--steps", "2",
                   "--audio-seconds", "1", "--timeout", "30", "--out", str(tmp_path), "--name", "cut"])
    assert stop.value.code == 143 and calls == [4.0, 8.0]
    report = json.loads((tmp_path / "cut.json").read_text())
    assert (report["complete"], report["cut_off"], report["not_run"]) == (False, "external at 8 req/s",
                                                                          ["external at 16 req/s"])
    [row] = report["policies"]["external"]
    assert row["offered_rps"] == 4.0 and row["ok"] == row["sent"] > 0
    md = (tmp_path / "cut.md").read_text()
    assert "`external at 8 req/s` was cut off" in md and "never ran: `external at 16 req/s`" in md
    assert (tmp_path / "cut.png").stat().st_size > 0


def test_the_gpu_summary_counts_a_load_run_without_both_policies_as_not_measured(tmp_path):
    import json

    from benchmarks.common import time_summary
    from benchmarks.gpu_summary import main

    stages = ("text_encoding", "denoiser_forward", "decode", "end_to_end")
    sao = {"runtime": "torch", "steps": 8, "duration_s": 11.9, "peak_rss_mb": 1.0, "load_s": 1.0,
           "batches": {"1": {s: time_summary([0.07]) for s in stages}}}
    (tmp_path / "latency-gpu-sao-small-sized.json").write_text(json.dumps(
        {"model": "sao", "results": [sao], "environment": {"gpu": "H100"}, "complete": False,
         "not_run": ["torch-bf16"], "cut_off": None}))
    row = {"offered_rps": 2.0, "goodput_rps": 1.9, "p50_s": 0.05, "p99_s": 0.08}
    (tmp_path / "load-gpu-sao-small-sized.json").write_text(json.dumps(
        {"environment": {"cuda": "H100"}, "policies": {"continuous": [row]}, "complete": False,
         "not_run": ["none at 2 req/s"], "cut_off": None}))
    md = main(["--name", "summary", "--results-dir", str(tmp_path)])
    assert "| continuous vs none | not measured |" in md
    assert "`latency-gpu-sao-small-sized`: **Incomplete.** The run ended early; never ran: `torch-bf16`." in md
    assert "`load-gpu-sao-small-sized`: **Incomplete.**" in md
    assert json.loads((tmp_path / "summary.json").read_text())["incomplete"] == [
        "latency-gpu-sao-small-sized", "load-gpu-sao-small-sized"]


def test_a_server_that_refuses_the_benchmarks_requests_stops_the_run_with_its_words(server):
    from benchmarks.load import preflight

    preflight(server.url, {"model": "tiny", "steps": 2}, (0.5, 1.0), timeout=30)  # answered: the run goes on
    with pytest.raises(SystemExit, match="refuses the benchmark's requests: 404"):
        preflight(server.url, {"model": "nope"}, (1.0, 1.0), timeout=30)
    with pytest.raises(SystemExit, match="duration: 600"):
        preflight(server.url, {"model": "tiny"}, (1.0, 600.0), timeout=30)  # the longest duration is the one tried


@pytest.mark.parametrize("settings, says", [
    ({"TTA_TICK_GRAPHS": "true"}, r"exited with 2; its log ends:.*TTA_TICK_GRAPHS.*needs device cuda"),
    # the server stays up, not ready, saying why: the benchmark does not wait out its timeout
    ({"TTA_DEFAULT_MODEL": "nope"}, r"could not load its models \(RuntimeError: required model.*'nope' not available"),
])
def test_a_server_that_fails_to_start_is_reported_with_the_end_of_its_log(model_dir, tmp_path, monkeypatch,
                                                                           settings, says):
    import os
    import tempfile
    import time

    from benchmarks.load import free_port, serve

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where serve keeps the server's log
    port = free_port()
    env = dict(os.environ, TTA_PORT=str(port), TTA_MODEL_DIR=str(model_dir), TTA_DEFAULT_MODEL="tiny",
               TTA_DEVICE="cpu", TTA_LOG_LEVEL="warning") | settings
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=f"(?s){says}"):
        serve(env, port, "the server", timeout=300, poll_s=0.1)
    assert time.monotonic() - t0 < 240  # well before the timeout
    assert not list(tmp_path.glob("tta-server-*"))  # its log is removed once read
