"""A sweep of hostile input that earlier checks missed: each is one line on stderr, exit code 2,
no traceback, and the folder the run was pointed at is left as it was.

Found by driving every command with bad input: non-finite budgets (a traceback from a NaN
sample count), infinite or impossible selection limits (a traceback from the report's
validation, or accepted), batch sizes beyond 64 bits, profiles holding a point twice or
written by a newer pomt (read as if valid), and ONNX opsets that onnx or ONNX Runtime
does not know (a traceback, and the exporter's own tracebacks on stderr).
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from conftest import needs, run_in_process

from pomt_cli import versions
from pomt_cli.formats.common import FORMAT_VERSION
from pomt_cli.formats.report import REPORT_FORMAT_VERSION

HUGE = str(10**19)  # beyond int64
HUGE_THREADS = str(100_000)  # more than any machine's cores: torch would exhaust memory starting them


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(root.rglob("*"))}


def one_line_error(code: int, err: str, words: tuple[str, ...]) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for word in words:
        assert word in lines[0], err


def repeat_first_row(path: Path) -> None:
    meta = pl.read_parquet_metadata(path)
    frame = pl.read_parquet(path)
    pl.concat([frame, frame.head(1)]).write_parquet(path, metadata=meta)


def newer_profile(path: Path) -> None:
    meta = json.loads(pl.read_parquet_metadata(path)["pomt"])
    meta["format_version"] = FORMAT_VERSION + 1
    pl.read_parquet(path).write_parquet(path, metadata={"pomt": json.dumps(meta)})


def newer_report(path: Path) -> None:
    data = json.loads(path.read_text())
    data["format_version"] = REPORT_FORMAT_VERSION + 1
    path.write_text(json.dumps(data))


@pytest.fixture
def inputs(tmp_path, profiles, capsys) -> dict[str, Path]:
    """The synthetic profiles and a compute-r report made from them, all in ``tmp_path/in``."""
    lat, acc = profiles
    code, _, err = run_in_process(["compute-r", "--latency", str(lat), "--accuracy", str(acc),
                                   "--output-dir", str(lat.parent)], capsys)
    assert code == 0, err
    return {"lat": lat, "acc": acc, "report": next(lat.parent.glob("compute_r_*.json"))}


COMPUTE_R = ["compute-r", "--latency", "{lat}", "--accuracy", "{acc}", "--output-dir", "{out}"]
PROFILE = ["profile", "--model", "digits-vit", "--device", "cpu", "--tokens", "65:49:16", "--no-lock-clocks",
           "--output-dir", "{out}"]
BENCH = ["bench", "--model", "vit_tiny_patch16_224", "--device", "cpu", "--no-lock-clocks", "--output-dir", "{out}"]

# (name, command line, what to damage first, words the error must hold)
SWEEP = [
    ("latency budget inf", [*COMPUTE_R, "--latency-budget", "inf"], None, ("--latency-budget inf", "finite")),
    ("accuracy drop inf", [*COMPUTE_R, "--max-accuracy-drop", "inf"], None, ("--max-accuracy-drop inf", "100")),
    ("accuracy drop 200", [*COMPUTE_R, "--max-accuracy-drop", "200"], None, ("--max-accuracy-drop 200", "100")),
    ("latency point twice", COMPUTE_R, ("lat", repeat_first_row), ("lat.parquet", "twice", "tokens 17")),
    ("accuracy point twice", COMPUTE_R, ("acc", repeat_first_row), ("acc.parquet", "twice", "tokens 17")),
    ("newer latency profile", COMPUTE_R, ("lat", newer_profile), ("lat.parquet", "a latency profile of format",
                                                                  "upgrade pomt")),
    ("newer accuracy profile", COMPUTE_R, ("acc", newer_profile), ("acc.parquet", "an accuracy profile of format",
                                                                   "upgrade pomt")),
    ("compute-r batch beyond int64", [*COMPUTE_R, "--batch-size", HUGE], None, ("--batch-size", "above")),
    ("newer report in refine", ["refine", "{report}", "--no-lock-clocks"], ("report", newer_report),
     ("compute-r report of format", "upgrade pomt")),
    ("newer report in bench", [*BENCH, "--r-from", "{report}"], ("report", newer_report),
     ("compute-r report of format", "upgrade pomt")),
    ("profile threads beyond cores", [*PROFILE, "--threads", HUGE_THREADS], None,
     (f"--threads {HUGE_THREADS}", "logical cores")),
    ("bench threads beyond cores", [*BENCH, "--threads", HUGE_THREADS], None, (f"--threads {HUGE_THREADS}", "cores")),
    ("profile budget inf", [*PROFILE, "--budget", "inf"], None, ("--budget", "not a finite number")),
    ("profile batch beyond int64", [*PROFILE, "--batch-size", HUGE], None, ("--batch-size", "above")),
    ("bench budget inf", [*BENCH, "--budget", "inf"], None, ("--budget", "not a finite number")),
    ("bench batch beyond int64", [*BENCH, "--batch-size", HUGE], None, ("--batch-size", "above")),
    ("refine budget inf", ["refine", "{report}", "--budget", "inf"], None, ("--budget", "not a finite number")),
    ("demo budget inf", ["demo", "--budget", "inf", "--output-dir", "{out}"], None, ("--budget", "not a finite")),
    ("export opset unknown to onnx", ["export", "--model", "digits-vit", "--output", "{out}/m.onnx", "--opset", "99"],
     None, ("opset 99", "at most")),
    ("export batch beyond int64", ["export", "--model", "digits-vit", "--output", "{out}/m.onnx",
                                   "--batch-size", HUGE], None, ("batch of", "does not fit in memory")),
    ("export batch beyond memory", ["export", "--model", "digits-vit", "--output", "{out}/m.onnx",
                                    "--batch-size", str(10**9)], None, ("batch of 1000000000", "does not fit")),
    ("export tolerance inf", ["export", "--model", "digits-vit", "--output", "{out}/m.onnx", "--tolerance", "inf"],
     None, ("--tolerance inf", "not a finite number")),
    ("export tolerance nan", ["export", "--model", "digits-vit", "--output", "{out}/m.onnx", "--tolerance", "nan"],
     None, ("--tolerance",)),
    ("export tolerance negative", ["export", "--model", "digits-vit", "--output", "{out}/m.onnx",
                                   "--tolerance", "-1"], None, ("--tolerance", "greater than or equal to 0")),
    ("profile ort providers without onnxruntime", [*PROFILE, "--ort-providers", "cpu"], None,
     ("--ort-providers", "add --runtime onnxruntime")),
    ("profile compile backend without compile", [*PROFILE, "--compile-backend", "eager"], None,
     ("--compile-backend", "add --runtime compile")),
    ("bench compile backend without compile", [*BENCH, "--runtime", "eager", "--compile-backend", "eager"], None,
     ("--compile-backend", "add --runtime compile")),
    ("bench ort providers without onnxruntime", [*BENCH, "--runtime", "eager", "--ort-providers", "cpu"], None,
     ("--ort-providers", "add --runtime onnxruntime")),
]


@pytest.mark.parametrize("args, damage, words", [
    pytest.param(*case[1:], id=case[0], marks=needs(versions.ONNX_EXPORT) if case[1][0] == "export" else ())
    for case in SWEEP])
def test_hostile_input_is_one_line_and_writes_nothing(tmp_path, inputs, capsys, monkeypatch, args, damage, words):
    monkeypatch.setenv("POMT_STATE_DIR", str(tmp_path / "state"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "kept.txt").write_text("an earlier file")
    if damage is not None:
        which, how = damage
        how(inputs[which])
    before = files_under(tmp_path)
    names = {key: str(path) for key, path in inputs.items()}
    code, _, err = run_in_process([a.format(out=out, **names) for a in args], capsys)
    one_line_error(code, err, words)
    assert files_under(tmp_path) == before


@needs(versions.ONNX_EXPORT)
def test_an_opset_onnx_runtime_cannot_load_is_one_line_and_keeps_no_file(tmp_path, capsys, monkeypatch):
    """onnx's newest opset (28 for onnx 1.23) exports, but ONNX Runtime 1.32 cannot load it.

    A newer ONNX Runtime may load it: then that run must succeed. Either way, a stand-in
    session that refuses the graph, as ONNX Runtime does, must give one line and no file.
    """
    import onnx
    import onnxruntime
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidGraph

    opset = onnx.defs.onnx_opset_version()
    output = tmp_path / "real" / "m.onnx"
    output.parent.mkdir()
    code, _, err = run_in_process(["export", "--model", "digits-vit", "--output", str(output),
                                   "--opset", str(opset)], capsys)
    if code == 0:  # an ONNX Runtime that loads the newest opset: the file is the run's result
        assert output.is_file()
    else:
        one_line_error(code, err, ("ONNX Runtime", f"opset {opset}", "lower opset", "not kept"))
        assert ".tmp" not in err and list(output.parent.iterdir()) == []

    def refuse(path, **kwargs):
        raise InvalidGraph(f"[ONNXRuntimeError] : 10 : INVALID_GRAPH : Load model from {path} failed:This is an "
                           "invalid model. Error: unsupported opset\nsecond line")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    output = tmp_path / "stand-in" / "m.onnx"
    output.parent.mkdir()
    code, _, err = run_in_process(["export", "--model", "digits-vit", "--output", str(output)], capsys)
    one_line_error(code, err, ("ONNX Runtime", "opset 18", "INVALID_GRAPH", "lower opset", "not kept"))
    assert ".tmp" not in err and "Load model from" not in err and list(output.parent.iterdir()) == []


def test_a_complete_profile_lacking_points_is_refused_as_damaged_by_resume(tmp_path, capsys, monkeypatch):
    """It was read as complete ("nothing to measure") and written again, still lacking them."""
    monkeypatch.setenv("POMT_STATE_DIR", str(tmp_path / "state"))
    args = ["profile", "--model", "digits-vit", "--device", "cpu", "--tokens", "65:17:16", "--threads", "1",
            "--no-lock-clocks", "--budget", "0.02", "--passes", "1", "--remeasure", "0"]
    code, _, err = run_in_process([*args, "--output-dir", str(tmp_path / "first")], capsys)
    assert code == 0, err
    (profile,) = (tmp_path / "first").glob("*.parquet")
    meta = pl.read_parquet_metadata(profile)
    assert json.loads(meta["pomt"])["complete"]
    pl.read_parquet(profile).head(3).write_parquet(profile, metadata=meta)
    out = tmp_path / "out"
    out.mkdir()
    before = files_under(tmp_path)
    code, _, err = run_in_process([*args, "--output-dir", str(out), "--resume", str(profile)], capsys)
    one_line_error(code, err, (str(profile), "marked complete but lacks 1 of its 4 points", "start afresh"))
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("command", [["status"], ["lock", "--dry-run"], ["lock"], ["restore"]])
def test_clocks_of_a_torch_device_that_is_no_device_name_is_one_line(tmp_path, capsys, fake_tools, command):
    """``torch.device('bogus')`` raised out of the clock controller: a traceback."""
    preset = tmp_path / "bogus.toml"
    preset.write_text((Path(__file__).parents[1] / "configs" / "devices" / "nvidia.toml").read_text()
                      .replace('torch_device = "cuda"', 'torch_device = "bogus"'))
    before = files_under(tmp_path)
    for args in (["--device", "nvidia", "--torch-device", "cuda:x"], ["--device", str(preset)]):
        code, _, err = run_in_process(["clocks", *command, *args], capsys)
        shown = "'cuda:x'" if "cuda:x" in args else "'bogus'"
        one_line_error(code, err, (f"torch device {shown} is not a device name", "use cpu, cuda"))
    assert files_under(tmp_path) == before
    assert fake_tools.calls() == []


@pytest.mark.parametrize("line, field", [('needs_root = "yes"', "clocks.needs_root"),
                                         ('needs_root = "false"', "clocks.needs_root"),
                                         ("needs_root = 1", "clocks.needs_root")])
def test_a_preset_field_of_the_wrong_type_is_refused_not_coerced(tmp_path, capsys, monkeypatch, line, field):
    """pydantic's lax mode read needs_root = "false" as False and "yes" as True."""
    monkeypatch.setenv("POMT_STATE_DIR", str(tmp_path / "state"))
    preset = tmp_path / "odd.toml"
    preset.write_text((Path(__file__).parents[1] / "configs" / "devices" / "cpu.toml").read_text()
                      .replace("needs_root = true", line))
    before = files_under(tmp_path)
    for args in (["clocks", "status", "--device", str(preset)],
                 [*PROFILE, "--device", str(preset)]):
        code, _, err = run_in_process([a.format(out=tmp_path / "out") for a in args], capsys)
        one_line_error(code, err, (str(preset), f"invalid at {field}", "valid boolean"))
    assert files_under(tmp_path) == before
