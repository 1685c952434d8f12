"""scripts/compare_profiles.py: bad input is one line on stderr with exit code 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import LAT_B1, load_script, script_refusal, write_accuracy, write_latency

compare_profiles = load_script("compare_profiles")


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(root.rglob("*"))}


@pytest.fixture
def folder(tmp_path) -> Path:
    write_latency(tmp_path / "a.parquet")
    write_latency(tmp_path / "b.parquet")
    write_latency(tmp_path / "rows0.parquet", {1: {}, 4: {}}, grid=sorted(LAT_B1, reverse=True), complete=False)
    write_latency(tmp_path / "oom.parquet", {b: dict.fromkeys(LAT_B1) for b in (1, 4)})
    write_accuracy(tmp_path / "acc.parquet")
    (tmp_path / "folder.parquet").mkdir()
    (tmp_path / "empty.parquet").write_bytes(b"")
    (tmp_path / "table.parquet").write_text("tokens,latency_ms\n17,4.0\n")
    return tmp_path


@pytest.mark.parametrize("args, words", [
    (["a"], ("two or more latency profiles", "--help")),
    (["a", "missing"], ("missing.parquet does not exist",)),
    (["a", "folder"], ("folder.parquet is a folder",)),
    (["a", "empty"], ("empty.parquet is not a readable Parquet file",)),
    (["a", "table"], ("table.parquet is not a readable Parquet file",)),
    (["a", "acc"], ("acc.parquet is an accuracy profile", "latency profile is needed")),
    (["a", "rows0"], ("rows0.parquet holds no measured points", "all out of memory")),
    (["oom", "a"], ("oom.parquet holds no measured points",)),
    (["a", "b", "--steps", "0"], ("--steps: 0 is out of range", ">= 1")),
    (["a", "b", "--steps", "-3"], ("--steps: -3 is out of range",)),
    (["a", "b", "--steps", "x"], ("--steps: 'x' is not a whole number",)),
    (["a", "b", "--steps", str(10**23)], ("is out of range", "<= 1000")),
])
def test_bad_input_is_one_line_and_exit_code_2(folder, capsys, args, words):
    argv = [a if a.startswith("-") or a.lstrip("-").isdigit() or a == "x" else str(folder / f"{a}.parquet")
            for a in args]
    before = files_under(folder)
    line = script_refusal(compare_profiles.main, argv, capsys)
    assert all(word in line for word in words), line
    assert files_under(folder) == before


def test_two_profiles_compare(folder, capsys):
    assert compare_profiles.main([str(folder / "a.parquet"), str(folder / "b.parquet"), "--steps", "1"]) == 0
    assert "Largest steps" in capsys.readouterr().out


def test_a_batch_size_without_measured_points_has_no_steps_to_compare(folder, capsys):
    # It read "batch 4: the same steps in every profile" when one profile had no point at batch 4.
    write_latency(folder / "b1.parquet", {1: LAT_B1, 4: dict.fromkeys(LAT_B1)})
    assert compare_profiles.main([str(folder / "a.parquet"), str(folder / "b1.parquet")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "batch 4: no measured points in b1.parquet" in out and "batch 1: the same steps" in out
