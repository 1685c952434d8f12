"""scripts/gpu_report.py --smoke: the GPU report's code paths on the CPU, so that the script cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pomt_cli import versions

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_report.py"


def test_the_smoke_run_fills_every_section_of_the_report(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--output-dir", str(tmp_path / "report"), "--smoke",
                           "--work-dir", str(tmp_path / "work")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["smoke"] is True
    try:
        import triton  # a dependency of torch on Linux x86-64

        expected = triton.__version__
    except ImportError:
        expected = None
    assert report["environment"]["info"]["triton"] == expected
    for name in ("core", "profile", "engine", "bench", "accuracy", "runtimes"):
        assert report[name]["status"] == "complete", (name, report[name])
    core = report["core"]["results"]
    assert [t["batch"] for t in core["tables"]] == [4, 1]
    for table in core["tables"]:
        variants = table["variants"]
        assert set(variants) == {"none", "pomt", "pomt(lean)", "pomt(explicit)", "ideal(pomt)", "tome", "ideal(tome)",
                                 "topk", "ideal(topk)"}
        assert variants["pomt"]["vs_ideal"] > 0 and variants["none"]["vs_none"] == 1.0
    scores = core["scores"][0]
    assert scores["lean_same_order"] and scores["lean_max_rel_error"] < 1e-5
    assert scores["product_same_order"] and scores["product_max_rel_error"] < 1e-5
    assert scores["received_kernel"] == "not tried (float32, or not CUDA)" and core["received_kernel"] == {}
    profile = report["profile"]["results"]
    assert [(p["name"], p["run"], p["points"]) for p in profile["profiles"]] == [
        ("bs4_float32_eager", "a", 6), ("bs4_float32_eager", "b", 6),
        ("bs1-4_float32_eager", "a", 12), ("bs1-4_float32_eager", "b", 12)]
    # The profiles themselves come back with the report, though the commands wrote them elsewhere.
    for p in profile["profiles"]:
        assert (tmp_path / "work" / p["file"]).is_file() and (tmp_path / "report" / p["file"]).is_file()
    assert {(a["name"], a["batch_size"]) for a in profile["agreement"]} == {
        ("bs4_float32_eager", 4), ("bs1-4_float32_eager", 1), ("bs1-4_float32_eager", 4)}
    engine = report["engine"]["results"]
    assert engine["settings"]["grid"] == [17, 14, 11, 8, 5, 2] and engine["settings"]["passes"] == 2
    (run,) = engine["runs"]
    assert run["name"] == "bs4_float32_eager" and run["points"] == 6
    # Every point is visited once per pass at least; the samples of its visits, traced from the
    # progress events, are exactly those the profile pooled for it.
    visits_of = {n: [v for v in run["visits"] if v["n"] == n] for n in engine["settings"]["grid"]}
    assert all(len(v) >= 2 for v in visits_of.values())
    assert {str(n): sum(len(v["samples_ms"]) for v in vs) for n, vs in visits_of.items()} == run["samples_per_point"]
    assert all(v["warmup_calls"] >= 1 and v["wall_s"] >= v["measure_s"] > 0 for v in run["visits"])
    summary = run["summary"]
    assert summary["visits"] == len(run["visits"]) and summary["timed_s"] > 0
    assert summary["calls_per_point_median"] >= engine["settings"]["min_samples"]
    assert abs(summary["timed_s"] + summary["warmup_s"] + summary["host_in_visits_s"] + summary["outside_visits_s"]
               - summary["wall_s"]) < 0.05
    rows = report["bench"]["results"]["rows"]
    assert report["bench"]["results"]["exit_code"] == 0
    assert {(r["batch_size"], r["setting"]) for r in rows} == {
        (b, s) for b in (1, 4) for s in ("none", "pomt r=16 @1", "tome r=2", "topk r=2")}
    accuracy = report["accuracy"]["results"]["result"]
    assert accuracy["images"] == 24 and accuracy["grid_points"] == 3 and accuracy["image_passes_per_s"] > 0
    runtimes = report["runtimes"]["results"]
    if versions.supported(versions.ONNX_EXPORT):
        assert runtimes["exit_code"] == 0 and runtimes["providers"]["onnxruntime"] == ["CPUExecutionProvider"]
        assert {(r["batch_size"], r["runtime"], r["setting"]) for r in runtimes["rows"]} == {
            (b, rt, s) for b in (1, 4) for rt in ("eager", "onnxruntime") for s in ("none", "pomt r=16 @1")}
        assert all(r["latency_ms"] > 0 for r in runtimes["rows"])
    else:  # the section records pomt bench's refusal, and the report goes on
        assert runtimes["exit_code"] == 2 and "ONNX export needs torch" in runtimes["error"]
    markdown = (tmp_path / "report" / "report.md").read_text()
    for heading in ("## core", "## profile", "## engine", "## bench", "## accuracy", "## runtimes", "## targets"):
        assert heading in markdown


def test_a_section_over_its_limit_is_cut_short_and_the_report_still_written(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--output-dir", str(tmp_path), "--smoke",
                           "--sections", "profile", "--limit", "profile=3"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["profile"]["status"] == "cut short at its limit of 3.0 s"
    assert "core" not in report and "## targets" in (tmp_path / "report.md").read_text()
