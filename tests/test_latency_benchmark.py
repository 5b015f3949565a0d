"""benchmarks/latency.py: rounds of each runtime are pooled stage by stage; benchmarks/interleaved.py runs runtimes side
by side on a tiny model."""
from __future__ import annotations

import pytest
import torch
from conftest import float32_default

from benchmarks.common import time_summary
from benchmarks.latency import pool_rounds


def _run(times: dict[str, list[float]], rss: float, load: float) -> dict:
    return {"runtime": "torch", "steps": 4, "duration_s": 10.0, "peak_rss_mb": rss, "load_s": load,
            "batches": {"2": {stage: time_summary(ts) for stage, ts in times.items()}}}


def test_rounds_pool_every_stage_and_keep_the_worst_memory():
    stages = ("text_encoding", "denoiser_forward", "decode", "end_to_end")
    fast = _run({s: [0.1, 0.2] for s in stages}, rss=900.0, load=2.0)
    slow = _run({s: [0.4, 0.3] for s in stages}, rss=950.0, load=3.0)
    pooled = pool_rounds([fast, slow])
    row = pooled["batches"]["2"]
    assert row["end_to_end"]["times_s"] == [0.1, 0.2, 0.3, 0.4] and row["end_to_end"]["repeats"] == 4
    assert row["decode"]["median_s"] == pytest.approx(0.25)
    assert row["rtf"] == pytest.approx(0.25 / (2 * 10.0))
    assert (pooled["rounds"], pooled["peak_rss_mb"], pooled["runtime"]) == (2, 950.0, "torch")


def test_the_floor_is_the_counted_work_at_the_measured_peak():
    from benchmarks.latency import count_flops, floor_section

    a, b = torch.randn(64, 32), torch.randn(32, 16)
    assert count_flops(lambda: a @ b) == 2 * 64 * 32 * 16
    stages = ("text_encoding", "denoiser_forward", "decode", "end_to_end")
    torch_run = _run({s: [0.2] for s in stages}, rss=900.0, load=2.0)
    torch_run["peak_matmul_flops"] = 1e11
    torch_run["batches"]["2"]["flops"] = {"text_encoding": 1e9, "denoiser_forward": 2e9, "decode": 3e9,
                                          "end_to_end": 1e9 + 4 * 2e9 + 3e9}
    ort_run = _run({s: [0.1] for s in stages}, rss=950.0, load=3.0) | {"runtime": "onnxruntime"}
    text = floor_section([torch_run, ort_run])
    assert "100 GFLOP/s" in text
    # 12 GFLOP -> 120 ms floor; best run 100 ms; no bandwidth measured: no weights column values
    assert "| 2 | end to end | 12 | - | 120 | compute | 100 | 0.8333 |" in text
    # with a copy bandwidth of 1 GB/s: the text encoder's 50 M float32 weights (190.7 MiB) take 200 ms to read,
    # more than its 10 ms of FLOPs; end to end reads 50 + 4 x 10 + 5 M weights (362.4 MiB, 380 ms)
    torch_run["peak_copy_bytes_per_s"] = 1e9
    torch_run["weight_params"] = {"text_encoding": 50_000_000, "denoiser_forward": 10_000_000, "decode": 5_000_000}
    text = floor_section([torch_run, ort_run])
    assert "1 GB/s" in text
    assert "| 2 | text encoding | 1 | 190.7 | 200 | weights | 100 | 0.5 |" in text
    assert "| 2 | end to end | 12 | 362.4 | 380 | weights | 100 | 0.2632 |" in text
    assert "counted on the `torch` run" in text
    # any runtime's run may count (--floor-runtime: an eager one where the others replay graphs)
    text = floor_section([ort_run, torch_run | {"runtime": "torch-bf16"}])
    assert "counted on the `torch-bf16` run" in text and "| 2 | end to end | 12 | 362.4 | 380 |" in text


@pytest.mark.slow
def test_interleaved_runtimes_are_timed_stage_by_stage_in_one_process(model_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    import json

    from service_support import TINY

    from benchmarks.interleaved import main

    with float32_default():
        data = main(["--model", str(model_dir / TINY), "--runtimes", "torch,onnxruntime", "--batches", "1,2",
                     "--repeats", "2", "--e2e-repeats", "1", "--duration", "0.5", "--out", str(tmp_path)])
    ort = data["results"]["onnxruntime"]
    for b in ("1", "2"):
        for stage in ("denoiser_forward", "decode", "end_to_end"):
            row = ort[b][stage]
            assert len(row["times_s"]) == (1 if stage == "end_to_end" else 2) and row["speedup"] > 0
            assert 0 <= row["faster_runs"] <= len(row["times_s"])
        assert ort[b]["denoiser_max_rel_error"] < 1e-4  # the same model under both runtimes
    assert json.loads((tmp_path / f"interleaved-{TINY}.json").read_text())["runtimes"] == ["torch", "onnxruntime"]
    md = (tmp_path / f"interleaved-{TINY}.md").read_text()
    assert "| onnxruntime | 2 | end to end |" in md and "| torch | 1 | decode |" in md


def test_the_gpu_summary_tables_every_run_and_plots_it(tmp_path):
    import json

    from benchmarks.gpu_summary import main

    stages = ("text_encoding", "denoiser_forward", "decode", "end_to_end")
    runs = {"sizes": [_run({s: [0.05, 0.07] for s in stages}, rss=900.0, load=2.0) | {"peak_gpu_mb": 512.0}],
            "other": [_run({s: [0.2] for s in stages}, rss=800.0, load=1.0) | {"runtime": "torch-bf16-cudagraphs"}]}
    for name, results in runs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"model": f"m-{name}", "results": results, "environment": {"gpu": "G", "git_commit": "abc"}}))
    md = main(["--inputs", "sizes,other", "--name", "summary", "--results-dir", str(tmp_path)])
    # batch 2, 4 steps of 10 s: end to end 60 ms -> 33.33 clips/s; no GPU memory recorded for the second run
    assert "| sizes | m-sizes | torch | 2 | 4 | 10 | 60 | 60 | 60 | 60 | 33.33 | 512 | 900 |" in md
    assert "| other | m-other | torch-bf16-cudagraphs | 2 | 4 | 10 | 200 | 200 | 200 | 200 | 10 | - | 800 |" in md
    assert (tmp_path / "summary.png").stat().st_size > 0 and "commit abc" in md
    assert ("Not found (not run, or failed): `load-gpu-sao-small-sized`, `decoder-precision-gpu-sao-small-sized`."
            in md)
    assert md.count("| not measured |") == 5  # neither run is one a target names


def test_the_gpu_summary_gives_each_target_its_verdict(tmp_path):
    import json

    from benchmarks.gpu_summary import main

    stages = ("text_encoding", "denoiser_forward", "decode", "end_to_end")

    def run(runtime: str, batches: dict[int, float]) -> dict:
        return {"runtime": runtime, "steps": 8, "duration_s": 11.9, "peak_rss_mb": 1.0, "load_s": 1.0,
                "batches": {str(b): {s: time_summary([t]) for s in stages} for b, t in batches.items()}}

    sao = [run("torch", {1: 0.070, 16: 0.5}), run("torch-bf16-cudagraphs-whole", {1: 0.018, 16: 0.1})]
    (tmp_path / "latency-gpu-sao-small-sized.json").write_text(json.dumps(
        {"model": "sao", "results": sao, "environment": {"gpu": "H100"}}))

    def rate(rps: float, goodput: float, p50: float, p99: float) -> dict:
        return {"offered_rps": rps, "goodput_rps": goodput, "p50_s": p50, "p99_s": p99}

    load = {"environment": {"cuda": "H100"}, "policies": {
        "none": [rate(20, 10.0, 0.05, 0.4), rate(80, 12.0, 3.0, 6.0)],
        "continuous": [rate(20, 19.0, 0.06, 0.09), rate(80, 60.0, 0.08, 0.2)]}}
    (tmp_path / "load-gpu-sao-small-sized.json").write_text(json.dumps(load))
    decoder = {"environment": {"gpu": "H100"}, "rows": [
        {"variant": v, "batch": b, "snr_db_min": snr} for v, b, snr in (
            ("float32", 1, 140.0), ("bfloat16", 1, 37.0), ("float16", 1, 55.0), ("float16", 16, 41.5))]}
    (tmp_path / "decoder-precision-gpu-sao-small-sized.json").write_text(json.dumps(decoder))
    md = main(["--name", "summary", "--results-dir", str(tmp_path)])
    # the float16 decoder's worst clip over both batch sizes (bfloat16's 37 dB is not the target's)
    assert ("| SAO-small-sized decoder in float16: worst SNR against float32, dB | >= 40 | 41.5 | float16 decoder "
            "| met |") in md
    # 18 ms <= 20 (the whole-generation runtime); 16 / 0.1 s = 160 clips/s >= 150; SA3 never ran
    assert ("| SAO-small-sized, 11.9 s, 8 steps, batch 1: end to end ms | <= 20 | 18 | torch-bf16-cudagraphs-whole "
            "| met |") in md
    assert "| SAO-small-sized, 11.9 s, batch 16: clips/s | >= 150 | 160 | torch-bf16-cudagraphs-whole | met |" in md
    assert "| SA3-small-sized, 30 s, 8 steps, batch 1: end to end ms | <= 25 | - | - | not measured |" in md
    # p99 bound 2 x 50 ms: only the 20/s rate qualifies (19 req/s), over none's best 12: 1.58x, not 4x
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["load"]["ratio"] == pytest.approx(19 / 12) and summary["load"]["p99_bound_s"] == 0.1
    assert "(100 ms) | >= 4 | 1.583 | continuous vs none | not met |" in md
    assert "`latency-gpu-sa3-small-sized-30s`" in md.split("Not found")[1]


def run_gpu_suite(tmp_path, stages: str, gpu_dir=None) -> list[list[str]]:
    """benchmarks/gpu_suite.sh with STAGES, its interpreter replaced by a script that records each call's arguments
    and then PYTHONPATH and GIT_COMMIT (the suite itself needs a CUDA machine); the calls after the one that prints
    the versions.
    ``gpu_dir``: what benchmarks/gpu_pack.sh packed (default: nothing)."""
    import os
    import subprocess
    from pathlib import Path

    log = tmp_path / "calls"
    recorder = tmp_path / "py"  # arguments end with \037, calls with \036: a -c program keeps its newlines
    recorder.write_text(f"#!/bin/sh\nprintf '%s\\037' \"$@\" \"$PYTHONPATH\" \"$GIT_COMMIT\" >> {log}\n"
                        f"printf '\\036' >> {log}\n")
    recorder.chmod(0o755)
    env = dict(os.environ, PYTHON=str(recorder), STAGES=stages, OUT=str(tmp_path / "out"), GIT_COMMIT="",
               GPU_DIR=str(gpu_dir or tmp_path / "gpu"), SAO_DIR=str(tmp_path / "sao"), SA3_DIR=str(tmp_path / "sa3"),
               PATH=f"{tmp_path}:{os.environ['PATH']}")
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\necho stand-in GPU\n")
    (tmp_path / "nvidia-smi").chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    subprocess.run(["bash", "benchmarks/gpu_suite.sh"], cwd=root, env=env, check=True, capture_output=True, timeout=60)
    calls = [call.split("\037")[:-1] for call in log.read_text().split("\036")[:-1]]
    versions = next(i for i, call in enumerate(calls) if call[0] == "-c" and "torch.__version__" in call[1])
    return calls[:versions] + calls[versions + 1:]


def test_the_gpu_suite_installs_what_was_packed_and_puts_it_on_the_path(tmp_path):
    packed = tmp_path / "packed"
    (packed / "wheels").mkdir(parents=True)
    (packed / "wheels" / "fastapi-1-py3-none-any.whl").write_bytes(b"")
    (packed / "site").mkdir()
    (packed / "commit").write_text("abc1234\n")
    install, tests = run_gpu_suite(tmp_path, "tests", packed)
    assert install[:3] == ["-m", "pip", "install"] and "--no-index" in install and "/tmp/site" in install
    assert install[-3].endswith("fastapi-1-py3-none-any.whl")
    assert tests[1] == "pytest" and tests[-2].split(":")[:2] == [str(packed / "site"), "/tmp/site"]
    assert tests[-1] == "abc1234"  # the commit gpu_pack.sh recorded: results name it


@pytest.mark.parametrize("stages, expected", [
    ("tests", ["pytest"]),
    ("sa3", ["'sa3-small'", "latency-gpu-sa3-small-sized-30s", "latency-gpu-sa3-small-sized-3s"]),
    ("sao decoder", ["'sao-small'", "latency-gpu-sao-small-sized", "decoder_precision"]),  # one write for both
    ("load", ["'sao-small'", "load-gpu-sao-small-sized"]),
    ("load tests", ["'sao-small'", "load-gpu-sao-small-sized", "pytest"]),  # in the order named
])
def test_the_gpu_suite_runs_the_stages_it_is_asked_for(tmp_path, stages, expected):
    calls = [call[:-2] for call in run_gpu_suite(tmp_path, stages)]
    assert len(calls) == len(expected)
    for call, what in zip(calls, expected):
        assert what in " ".join(call), (call, what)


@pytest.mark.parametrize("fails", [False, True])
def test_the_gpu_suite_writes_a_checkpoint_once_and_never_leaves_a_broken_one(tmp_path, fails):
    """The random checkpoint is written into <dir>.part and renamed when the writer succeeds: a write that fails or is
    cut off leaves no directory that a later stage or call would take for a checkpoint, and is not retried within
    the call."""
    import os
    import subprocess
    from pathlib import Path

    fake = tmp_path / "py"  # writes part of a checkpoint where it is asked to, then succeeds or fails
    fake.write_text("#!/bin/sh\n"
                    "case \"$2\" in *write_random_checkpoint*)\n"
                    "  dir=$(printf '%s' \"$2\" | sed -n \"s/^w('\\(.*\\)', '.*')$/\\1/p\")\n"
                    f"  echo \"$dir\" >> {tmp_path}/writes; mkdir -p \"$dir\"; : > \"$dir/model.safetensors\"\n"
                    f"  exit {1 if fails else 0};;\nesac\n")
    fake.chmod(0o755)
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\n")
    (tmp_path / "nvidia-smi").chmod(0o755)
    sao = tmp_path / "sao"
    env = dict(os.environ, PYTHON=str(fake), STAGES="sao decoder load", OUT=str(tmp_path / "out"), GIT_COMMIT="",
               GPU_DIR=str(tmp_path / "gpu"), SAO_DIR=str(sao), PATH=f"{tmp_path}:{os.environ['PATH']}")
    root = Path(__file__).resolve().parents[1]
    subprocess.run(["bash", "benchmarks/gpu_suite.sh"], cwd=root, env=env, check=True, capture_output=True, timeout=60)
    assert (tmp_path / "writes").read_text().split() == [f"{sao}.part"]  # once, for the three stages
    assert sao.is_dir() != fails and (sao / "model.safetensors").is_file() != fails
    assert "=== " in (tmp_path / "out" / "gpu-suite.log").read_text()  # the whole output is kept beside the results


def test_every_call_of_the_gpu_suite_is_one_its_programs_accept(tmp_path):
    """Every stage's command, checked here so that a lent GPU's minutes are not lost to a renamed option: each
    benchmark's arguments parse (runtime names included), each test file the suite names has tests marked gpu, each
    function its checkpoint writers import exists."""
    import ast
    import importlib
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    calls = [call[:-2] for call in run_gpu_suite(tmp_path, "tests sao decoder sa3 embedded compile load")]
    modules = [call[1] for call in calls if call[0] == "-m"]
    assert modules.count("benchmarks.latency") == 5 and "benchmarks.load" in modules and "pytest" in modules
    for call in calls:
        if call[:2] == ["-m", "pytest"]:
            targets = [a for a in call[2:] if a.startswith("tests/")]
            assert targets and all((root / t).is_file() for t in targets) and call[call.index("-m", 1) + 1] == "gpu"
            collected = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", "-m",
                                        "gpu", *targets], cwd=root, capture_output=True, text=True, timeout=120)
            assert collected.returncode == 0, collected.stdout[-2000:]
            assert all(f"{t}::" in collected.stdout for t in targets), collected.stdout  # each file has gpu tests
        elif call[0] == "-m":
            importlib.import_module(call[1]).parse_args(call[2:])
        else:
            assert call[0] == "-c", call
            for node in ast.walk(ast.parse(call[1])):
                if isinstance(node, ast.ImportFrom):
                    module = importlib.import_module(node.module)
                    assert all(hasattr(module, alias.name) for alias in node.names), call[1]


def test_a_benchmark_refuses_an_unknown_runtime_or_decoder_type_before_loading_anything(capsys):
    from benchmarks import decoder_precision, latency

    assert latency.parse_args(["--runtimes", "torch-bf16-cudagraphs-ticks,onnxruntime"]).batches == [1, 4]
    with pytest.raises(SystemExit):
        latency.parse_args(["--runtimes", "torch,torch-bf16-graphs"])
    assert "unknown runtime torch-bf16-graphs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        latency.parse_args(["--runtimes", "torch-bf16", "--floor-runtime", "torch-bf61"])
    assert "unknown --floor-runtime torch-bf61" in capsys.readouterr().err
    assert latency.parse_args(["--runtimes", "torch-bf16"]).floor_runtime == "torch"  # none measured: said
    assert "no floor is measured" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        decoder_precision.parse_args(["--types", "float16,float8"])
    assert "unknown decoder type float8" in capsys.readouterr().err


def test_a_runtime_suffix_names_the_runners_graphs():
    from benchmarks.latency import runner_options

    assert runner_options("torch-bf16-cudagraphs-whole") == ("torch-bf16-cudagraphs", {"whole_generation": True})
    assert runner_options("torch-bf16-ticks") == ("torch-bf16", {"tick_graphs": True})
    assert runner_options("onnxruntime") == ("onnxruntime", {})


def test_no_timed_end_to_end_run_pays_for_a_capture():
    from pipeline_support import record_eagerly

    from benchmarks.latency import e2e_warmups
    from models.bundle import ModelBundle
    from models.generation_graph import WholeGeneration
    from models.registry import ZOO
    from models.tick_graph import TickGraphs
    from service.runner import ModelRunner
    from service.runtimes import TorchRuntime

    with float32_default():
        runner = ModelRunner(TorchRuntime(ModelBundle.load(ZOO / "tta-arc")))
    assert e2e_warmups(runner) == 1
    runner.whole = WholeGeneration(runner.pipeline, capture_after=2, record=record_eagerly)  # as on a GPU
    assert e2e_warmups(runner) == 2
    runner.whole, runner.ticks = None, TickGraphs(runner.pipeline, capture_after=3, record=record_eagerly)
    assert e2e_warmups(runner) == 3


def test_a_workers_partial_result_is_kept_and_its_failure_named(tmp_path):
    """A worker rewrites its result after each batch size; what it left is kept when it fails or is stopped."""
    import json

    from benchmarks.latency import worker_result

    stages = ("text_encoding", "denoiser_forward", "decode", "end_to_end")
    out = tmp_path / "w.json"
    assert worker_result(out, 1) == (None, "exit 1") and worker_result(out, None) == (None, "stopped")
    out.write_text(json.dumps(_run({s: [0.1] for s in stages}, rss=1.0, load=1.0) | {"batches": {}}))
    assert worker_result(out, 137) == (None, "exit 137")  # nothing finished yet
    partial = _run({s: [0.1] for s in stages}, rss=1.0, load=1.0) | {"complete": False}
    out.write_text(json.dumps(partial))
    assert worker_result(out, 1) == (partial, "exit 1; its batches 2 were measured and are kept")
    assert worker_result(out, None)[1] == "stopped; its batches 2 were measured and are kept"
    assert worker_result(out, 0) == (partial, None)
    # pooled with a whole round: batch 2 from both, batch 8 from the whole one; the runtime is marked incomplete
    whole = _run({s: [0.3] for s in stages}, rss=2.0, load=1.0) | {"complete": True}
    whole["batches"]["8"] = whole["batches"]["2"]
    pooled = pool_rounds([whole, partial])
    assert pooled["batches"]["2"]["end_to_end"]["repeats"] == 2 and pooled["batches"]["8"]["end_to_end"]["repeats"] == 1
    assert pooled["complete"] is False and pool_rounds([whole])["complete"] is True


@pytest.mark.slow
def test_a_latency_run_stopped_at_its_time_limit_keeps_what_it_measured(model_dir, tmp_path):
    """What ``timeout`` does at a stage's limit in benchmarks/gpu_suite.sh (SIGTERM to the process group) leaves the
    finished runtimes' results written, marked incomplete, with what was cut off."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "benchmarks.latency", "--model", str(model_dir / "tiny"), "--runtimes", "torch",
           "--rounds", "2", "--batches", "1,2", "--repeats", "1", "--e2e-repeats", "1", "--steps", "2",
           "--results-dir", str(tmp_path), "--name", "cut"]
    proc = subprocess.Popen(cmd, cwd=root, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "cut.md").is_file():  # written after the json, once round 1 finished
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        first = json.loads((tmp_path / "cut.json").read_text())
        assert (first["complete"], first["not_run"], first["cut_off"]) == (False, ["torch (round 2)"], None)
        time.sleep(0.5)  # round 2's worker is starting (importing torch takes seconds)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 143
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    data = json.loads((tmp_path / "cut.json").read_text())
    assert (data["complete"], data["not_run"], data["cut_off"], data["failed"]) == (False, [], "torch (round 2)", [])
    [torch_run] = data["results"]
    assert torch_run["rounds"] == 1 and list(torch_run["batches"]) == ["1", "2"]
    assert "`torch (round 2)` was cut off" in (tmp_path / "cut.md").read_text()


def test_operations_are_counted_as_kernels_or_views(model_dir, tmp_path):
    """benchmarks.op_count: an operation whose outputs share an input's memory is a view (no GPU kernel); one that
    writes new memory is a kernel; a forward's counts come out per operation."""
    import json

    from benchmarks.op_count import OpCounter, main

    x = torch.randn(4, 6)
    with torch.inference_mode(), OpCounter() as counted:
        x.t(), x.transpose(0, 1).contiguous(), x + 1, x.to(torch.float32), x.to(torch.float16), x[:, :2]
        torch.cat([x, x])
    assert dict(counted.kernels) == {"contiguous": 1, "add": 1, "to": 1, "cat": 1}
    assert dict(counted.views) == {"t": 1, "transpose": 1, "to": 1, "slice": 1}
    with float32_default():
        data = main(["--model", str(model_dir / "tiny"), "--batch", "2", "--duration", "1",
                     "--results-dir", str(tmp_path), "--name", "ops"])
    saved = json.loads((tmp_path / "ops.json").read_text())
    assert saved["kernels"] == data["kernels"] == sum(saved["kernels_by_op"].values()) > 0
    assert saved["kernels_by_op"]["linear"] > 0 and saved["batch"] == 2
    assert f"**{data['kernels']} kernels**" in (tmp_path / "ops.md").read_text()
