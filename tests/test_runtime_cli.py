"""--runtime in profile and bench: the workloads run in each runtime, the metadata says which, refusals, --r-from."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch
from conftest import MODEL, needs, run_in_process, runtime_param, write_accuracy, write_latency

from pomt_cli import versions
from pomt_cli.measure import runtimes
from pomt_cli.formats.latency import read_latency
from pomt_cli.formats.report import read_report
from pomt_cli.measure.grid import GridProgress
from pomt_cli.options import TokenRange
from pomt_cli.pipelines import ProfileSettings, Reporter, profile

FAST = ["--budget", "0.05", "--min-samples", "3", "--warmup", "1", "--passes", "1", "--remeasure", "0"]
DIGITS = ["--device", "cpu", "--model", "digits-vit", "--batch-size", "1", "--no-lock-clocks"]
BENCH = ["bench", *DIGITS, "-r", "20", "--layer", "1", "--method", "pomt", "--budget", "0.02", "--rounds", "1"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test exports into its own ONNX cache folder."""
    monkeypatch.setenv("POMT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnx"


@needs(versions.ONNX_EXPORT)
def test_an_onnxruntime_profile_exports_each_point_once_and_says_so(tmp_path, capsys, cache):
    before = runtimes.exports_done
    args = ["profile", *DIGITS, "--tokens", "65:25:20", "--runtime", "onnxruntime", "--output-dir", str(tmp_path),
            *FAST, "--passes", "2"]
    code, out, err = run_in_process(args, capsys)
    assert code == 0, err
    parquet = tmp_path / "latency_digits-vit_cpu_bs1_float32_onnxruntime.parquet"
    frame, meta = read_latency(parquet)
    assert frame["tokens"].to_list() == [65, 45, 25] and frame["latency_ms"].min() > 0
    assert meta.runtime == "onnxruntime" and meta.runtime_info["providers"] == ["CPUExecutionProvider"]
    assert meta.runtime_info["onnxruntime_version"] and meta.runtime_info["opset"] == 18
    # One graph per grid point, cached, although each point was visited twice.
    assert runtimes.exports_done - before == 3 and len(list(cache.glob("*.onnx"))) == 3
    assert "runtime: onnxruntime (ONNX Runtime" in out
    # A second run reuses the cached graphs.
    code, _, err = run_in_process([*args[:-6], "--output-dir", str(tmp_path / "again"), *FAST], capsys)
    assert code == 0, err
    assert runtimes.exports_done - before == 3


@needs(versions.COMPILE)
def test_a_compiled_pomt_profile_says_so_and_eager_names_stay(tmp_path, capsys):
    args = ["profile", *DIGITS, "--tokens", "65:45:20", "--method", "pomt", "--layer", "1", "--output-dir",
            str(tmp_path), *FAST]
    code, _, err = run_in_process([*args, "--runtime", "compile", "--compile-backend", "eager"], capsys)
    assert code == 0, err
    frame, meta = read_latency(tmp_path / "latency_digits-vit_cpu_bs1_float32_pomt-layer1_compile.parquet")
    assert frame.select("layer", "tokens").rows() == [(1, 65), (1, 45)]
    assert meta.runtime == "compile" and meta.runtime_info["compile_backend"] == "eager"
    code, _, err = run_in_process(args, capsys)
    assert code == 0, err
    _, meta = read_latency(tmp_path / "latency_digits-vit_cpu_bs1_float32_pomt-layer1.parquet")
    assert meta.runtime == "eager" and meta.runtime_info["runtime"] == "eager"


@needs(versions.COMPILE)
def test_profile_reports_each_point_made_ready_before_it_is_timed(tmp_path):
    class Recorder(Reporter):
        def __init__(self) -> None:
            self.events: list[tuple[str, int, int | None]] = []

        def grid(self, event: GridProgress) -> None:
            if event.frame is None:
                self.events.append((event.phase, event.tokens, event.layer))

    recorder = Recorder()
    settings = ProfileSettings(model="digits-vit", device="cpu", tokens=TokenRange(start=65, stop=45, stride=20),
                               budget_s=0.05, min_samples=3, warmup=1, passes=2, remeasure=0, workload="pomt",
                               layers=[2], lock_clocks=False, output_dir=tmp_path, runtime="compile",
                               compile_backend="eager")
    profile(settings, recorder)
    # The warm-up point (n = 65) is compiled before anything is measured; each point once, before its first visit.
    compiled = [e for e in recorder.events if e[0] == "compile"]
    assert sorted(compiled) == [("compile", 45, 2), ("compile", 65, 2)] and recorder.events[0] == ("compile", 65, 2)
    first_visit = next(i for i, e in enumerate(recorder.events) if e == ("measure", 45, 2))
    assert recorder.events.index(("compile", 45, 2)) == first_visit + 1
    assert [e[0] for e in recorder.events].count("measure") == 4


@pytest.mark.parametrize("runtime, extra, stem", [
    ("eager", [], ""),
    runtime_param("compile", ["--compile-backend", "eager"], "_compile"),
    runtime_param("onnxruntime", ["--ort-providers", "cpu"], "_onnxruntime"),
])
def test_bench_runs_none_and_pomt_in_each_runtime(tmp_path, capsys, runtime, extra, stem):
    code, out, err = run_in_process([*BENCH, "--runtime", runtime, *extra, "--output-dir", str(tmp_path)], capsys)
    assert code == 0, err
    parquet = tmp_path / f"bench_digits-vit_cpu_bs1_float32_none_pomt-r20-l1{stem}.parquet"
    frame = pl.read_parquet(parquet)
    assert frame["setting"].to_list() == ["none", "pomt r=20 @1"] and frame["tokens_out"].to_list() == [65, 45]
    assert frame["latency_ms"].min() > 0
    meta = json.loads(pl.read_parquet_metadata(parquet)["pomt"])
    assert meta["runtime"] == runtime and meta["runtime_info"]["runtime"] == runtime
    assert meta["runtime_info"]["providers"] == (["CPUExecutionProvider"] if runtime == "onnxruntime" else None)
    assert {"eager": "eager", "compile": "compile (eager)", "onnxruntime": "onnxruntime (CPU)"}[runtime] in out


@pytest.mark.parametrize("command", ["profile", "bench"])
@pytest.mark.parametrize("args, message", [
    (["--runtime", "compile", "--cuda-graphs"], "--cuda-graphs times eager PyTorch only"),
    pytest.param(["--runtime", "onnxruntime", "--ort-providers", "cpu,NoSuchExecutionProvider"],
                 "--ort-providers NoSuchExecutionProvider is not available here (available: ",
                 marks=needs(versions.ONNX_EXPORT)),
    pytest.param(["--runtime", "onnxruntime", "--ort-providers", "cuda"], "available here",
                 marks=needs(versions.ONNX_EXPORT)),
    pytest.param(["--runtime", "onnxruntime", "--dtype", "bfloat16"], "--runtime onnxruntime on cpu takes float32",
                 marks=needs(versions.ONNX_EXPORT)),
    (["--runtime", "onnxruntime", "--ort-providers", ","], "--ort-providers ',' names no provider"),
    (["--runtime", "tensorrt"], "Invalid value for '--runtime'"),
])
def test_unsupported_runtimes_are_refused_in_one_line_before_anything_is_written(tmp_path, capsys, command, args,
                                                                                 message, cache):
    base = ["profile", *DIGITS, *FAST] if command == "profile" else BENCH
    code, _, err = run_in_process([*base, "--output-dir", str(tmp_path / "runs"), *args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists() and not cache.exists()


@needs(versions.ONNX_EXPORT)
@pytest.mark.parametrize("command, runtime", [("profile", "onnxruntime"), ("bench", "onnxruntime"),
                                              ("bench", "eager,onnxruntime")])
def test_without_the_onnx_extra_the_runtime_is_refused_naming_it(tmp_path, capsys, monkeypatch, command, runtime):
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)
    base = ["profile", *DIGITS, *FAST] if command == "profile" else BENCH
    code, _, err = run_in_process([*base, "--runtime", runtime, "--output-dir", str(tmp_path / "runs")], capsys)
    assert code == 2 and 'pip install -e ".[onnx]"' in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def report_of_runtime(tmp_path, capsys, runtime: str, info: dict) -> Path:
    """compute-r's report from a latency profile of ``runtime`` (its ``runtime_info`` ``info``)."""
    lat = write_latency(tmp_path / "lat.parquet", runtime=runtime, runtime_info=info)
    acc = write_accuracy(tmp_path / "acc.parquet")
    code, _, err = run_in_process(["compute-r", "--latency", str(lat), "--accuracy", str(acc), "--output-dir",
                                   str(tmp_path / "r")], capsys)
    assert code == 0, err
    return next((tmp_path / "r").glob("*.json"))


def test_compute_r_records_the_runtime_and_bench_refuses_another(tmp_path, capsys):
    info = {"runtime": "onnxruntime", "providers": ["CPUExecutionProvider"], "onnxruntime_version": "1.0"}
    path = report_of_runtime(tmp_path, capsys, "onnxruntime", info)
    report = read_report(path)
    assert report.runtime == "onnxruntime" and report.latency.runtime_info["providers"] == ["CPUExecutionProvider"]
    base = ["bench", "--model", MODEL, "--device", "cpu", "--r-from", str(path), "--output-dir", str(tmp_path / "o")]
    code, _, err = run_in_process(base, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert (f"--r-from {path} chose R from a latency profile measured on onnxruntime, but this bench runs --runtime "
            "eager: bench with --runtime onnxruntime, or profile with --runtime eager and run compute-r again") in err
    # A report of a profile that names no runtime (written before runtimes) is eager.
    old = json.loads(path.read_text())
    del old["latency"]["runtime"], old["latency"]["runtime_info"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert read_report(tmp_path / "old.json").runtime == "eager"
    code, _, err = run_in_process([*base[:-4], "--r-from", str(tmp_path / "old.json"), "--runtime", "compile",
                                   "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "measured on eager, but this bench runs --runtime compile" in err
    assert not (tmp_path / "o").exists()


@needs(versions.COMPILE)
def test_a_workload_that_does_not_compile_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    original = runtimes.forward_kept

    def with_a_graph_break(model, images, keep):
        torch._dynamo.graph_break()
        return original(model, images, keep)

    monkeypatch.setattr(runtimes, "forward_kept", with_a_graph_break)
    code, _, err = run_in_process(["profile", *DIGITS, "--tokens", "65:25:20", "--runtime", "compile",
                                   "--compile-backend", "eager", "--output-dir", str(tmp_path / "runs"), *FAST],
                                  capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "digits-vit proxy n=25 does not compile as one graph" in err and "use --runtime eager" in err
    assert not (tmp_path / "runs").exists()


@needs(versions.COMPILE)
@pytest.mark.parametrize("command", ["profile", "bench"])
def test_an_unknown_compile_backend_is_one_line_before_anything_is_written(tmp_path, capsys, command):
    base = ["profile", *DIGITS, *FAST] if command == "profile" else BENCH
    code, _, err = run_in_process([*base, "--runtime", "compile", "--compile-backend", "nonsense", "--output-dir",
                                   str(tmp_path / "runs")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--compile-backend 'nonsense' is not a torch.compile backend here: use inductor or eager" in err
    assert not (tmp_path / "runs").exists()


def test_bench_refuses_a_report_compiled_by_another_backend(tmp_path, capsys):
    path = report_of_runtime(tmp_path, capsys, "compile", {"runtime": "compile", "compile_backend": "eager"})
    assert read_report(path).latency.runtime_info["compile_backend"] == "eager"
    code, _, err = run_in_process(["bench", "--model", MODEL, "--device", "cpu", "--r-from", str(path), "--runtime",
                                   "compile", "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert (f"--r-from {path} chose R from a latency profile compiled with backend eager, but this bench compiles "
            "with inductor: add --compile-backend eager, or profile with --compile-backend inductor and run "
            "compute-r again") in err
    assert not (tmp_path / "o").exists()
