"""One typed reader per file format: profiles from other tools, older files, bench reports."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from conftest import (ACC, GEOMETRY, LAT_B1, LAT_B4, latency_frame, run_in_process, run_pomt, write_accuracy,
                      write_latency)

from pomt_cli.errors import PomtError
from pomt_cli.formats.accuracy import read_accuracy
from pomt_cli.formats.bench import PREDICTION_COLUMNS, SCHEMA, read_bench
from pomt_cli.formats.common import ProfileMeta, write_profile
from pomt_cli.formats.latency import read_latency
from pomt_cli.formats.report import read_report
from pomt_cli.models import load_state_dict
from pomt_cli.selection import SelectionSettings, compute_r


def test_profiles_without_pomts_own_fields_read_typed(tmp_path):
    lat, acc = write_latency(tmp_path / "lat.parquet"), write_accuracy(tmp_path / "acc.parquet")
    frame, meta = read_latency(lat)
    assert (meta.model, meta.num_tokens, meta.batch_sizes, meta.device_preset) == (GEOMETRY["model"], 17, [1, 4],
                                                                                    "orin")
    assert meta.clocks is None and meta.rel_precision is None and meta.recorded("host") == "board"
    assert frame["tokens"].to_list() == [*LAT_B1, *LAT_B4] and frame["layer"].is_null().all()
    frame, meta = read_accuracy(acc)
    assert meta.estimator == "random" and meta.num_images == 1000 and meta.layer is None and meta.images is None
    assert frame["accuracy"].to_list() == list(ACC.values())


def test_a_profile_with_only_the_common_fields_is_chosen_from(tmp_path):
    common = {**GEOMETRY, "dtype": "float16", "grid": sorted(LAT_B1, reverse=True)}
    lat = write_profile(tmp_path / "lat.parquet", latency_frame({1: LAT_B1}), ProfileMeta(kind="latency", **common))
    acc = write_accuracy(tmp_path / "acc.parquet")
    _, meta = read_latency(lat)
    assert meta.batch_sizes is None and meta.torch_device is None and meta.recorded("complete") is None
    report = compute_r(lat, acc, SelectionSettings()).report
    assert [c.batch_size for c in report.choices] == [1] and report.latency.device_preset is None
    assert report.latency.dtype == "float16" and report.latency.host == meta.host


def test_a_profile_of_the_other_kind_or_a_damaged_field_is_one_line(tmp_path):
    lat, acc = write_latency(tmp_path / "lat.parquet"), write_accuracy(tmp_path / "acc.parquet")
    with pytest.raises(PomtError, match="is an accuracy profile, but a latency profile is needed"):
        read_latency(acc)
    with pytest.raises(PomtError, match="is a latency profile, but an accuracy profile is needed"):
        read_accuracy(lat)
    write_latency(lat, clocks={"preset": "orin", "mode": "sometimes"})
    with pytest.raises(PomtError, match=r"damaged pomt metadata \(field clocks.mode"):
        read_latency(lat)


@pytest.fixture(scope="module")
def bench_file(tmp_path_factory) -> Path:
    """The Parquet file of a short ``pomt bench`` of the digits model: none and POMT r=8."""
    out = tmp_path_factory.mktemp("bench")
    done = run_pomt("bench", "--model", "digits-vit", "--method", "pomt", "-r", "8", "--budget", "0.02",
                    "--rounds", "1", "--no-lock-clocks", "--output-dir", str(out))
    assert done.returncode == 0, done.stderr
    return next(out.glob("bench_*.parquet"))


def test_read_bench_gives_the_frame_and_the_typed_metadata(bench_file):
    frame, meta = read_bench(bench_file)
    assert frame.schema == pl.Schema(SCHEMA) and frame["method"].to_list() == ["none", "pomt"]
    assert meta.kind == "bench" and meta.model == "digits-vit" and meta.methods == ["none", "pomt"]
    assert meta.settings["1"][1].r == 8 and meta.clocks.mode == "unlocked"


def test_a_bench_report_of_version_1_reads_with_null_predictions(bench_file, tmp_path):
    stored, _ = read_bench(bench_file)
    data = json.loads(pl.read_parquet_metadata(bench_file)["pomt"])
    old = tmp_path / "old.parquet"
    stored.drop(PREDICTION_COLUMNS).write_parquet(old, metadata={"pomt": json.dumps({**data, "format_version": 1})})
    frame, meta = read_bench(old)
    assert meta.format_version == 1 and frame.columns == list(SCHEMA)
    assert frame.select(PREDICTION_COLUMNS).null_count().row(0) == (2,) * len(PREDICTION_COLUMNS)
    assert frame.drop(PREDICTION_COLUMNS).equals(stored.drop(PREDICTION_COLUMNS))


def test_a_pomt_file_given_where_another_kind_is_needed_is_named(bench_file, tmp_path, capsys):
    """The realistic mix-ups (a profile for the report, the report for a profile, a bench report
    for a profile, any of them for the weights) name what the file is, not "corrupt"."""
    lat, acc = write_latency(tmp_path / "lat.parquet"), write_accuracy(tmp_path / "acc.parquet")
    code, _, err = run_in_process(["compute-r", "--latency", str(lat), "--accuracy", str(acc), "--output-dir",
                                   str(tmp_path / "r")], capsys)
    assert code == 0, err
    report = next((tmp_path / "r").glob("*.json"))
    needs_report = "not a compute-r report: give the .json file written by pomt compute-r"
    with pytest.raises(PomtError, match=f"is a latency profile \\(from `pomt profile`\\), {needs_report}"):
        read_report(lat)
    with pytest.raises(PomtError, match=f"is a bench report \\(from `pomt bench`\\), {needs_report}"):
        read_report(bench_file)
    with pytest.raises(PomtError, match="is a compute-r report \\(from `pomt compute-r`\\), not a profile"):
        read_latency(report)
    with pytest.raises(PomtError, match="is a bench report \\(from `pomt bench`\\), but an accuracy profile"):
        read_accuracy(bench_file)
    with pytest.raises(PomtError, match="checkpoint .* is an accuracy profile .*, not weights: give a .safetensors"):
        load_state_dict(acc)
    for args in (["refine", str(acc)], ["bench", "--model", "digits-vit", "--r-from", str(lat)],
                 ["compute-r", "--latency", str(report), "--accuracy", str(acc)]):
        args = [*args, "--output-dir", str(tmp_path / "o")] if args[0] != "refine" else args
        code, _, err = run_in_process(args, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "corrupt" not in err and " is a" in err, err
    assert not (tmp_path / "o").exists()


def test_bad_bench_files_are_one_line_errors(bench_file, tmp_path):
    with pytest.raises(PomtError, match="does not exist: give the .parquet file written by pomt bench"):
        read_bench(tmp_path / "none.parquet")
    lat = write_latency(tmp_path / "lat.parquet")
    with pytest.raises(PomtError, match="is not a pomt bench report"):
        read_bench(lat)
    stored = pl.read_parquet(bench_file)
    data = json.loads(pl.read_parquet_metadata(bench_file)["pomt"])
    damaged = tmp_path / "damaged.parquet"
    stored.write_parquet(damaged, metadata={"pomt": json.dumps({**data, "rounds": "three"})})
    with pytest.raises(PomtError, match=r"damaged \(field rounds: .*write it again with pomt bench"):
        read_bench(damaged)
    stored.with_columns(pl.col("latency_ms").cast(pl.String)).write_parquet(damaged, metadata={"pomt": json.dumps(data)})
    with pytest.raises(PomtError, match="column latency_ms has type String, not Float64"):
        read_bench(damaged)
    stored.drop("setting").write_parquet(damaged, metadata={"pomt": json.dumps(data)})
    with pytest.raises(PomtError, match="lacks the column"):
        read_bench(damaged)


def test_a_bench_report_of_version_2_keeps_its_absolute_prediction_as_profile_ms(bench_file, tmp_path):
    stored, _ = read_bench(bench_file)
    data = json.loads(pl.read_parquet_metadata(bench_file)["pomt"])
    new = ["profile_ms", "predicted_ratio", "predicted_ratio_low", "predicted_ratio_high", "slower_than_none"]
    v2 = stored.drop(new).with_columns(predicted_ms=pl.Series([12.8, 9.6]),
                                       prediction_error=pl.Series([None, 8.0 / 9.6 - 1]),
                                       predicted_by=pl.Series(["pomt", "pomt"]))
    old = tmp_path / "v2.parquet"
    v2.write_parquet(old, metadata={"pomt": json.dumps({**data, "format_version": 2})})
    frame, meta = read_bench(old)
    assert meta.format_version == 2 and frame.columns == list(SCHEMA)
    assert frame["profile_ms"].to_list() == frame["predicted_ms"].to_list() == [12.8, 9.6]
    assert frame["prediction_error"][1] == pytest.approx(8.0 / 9.6 - 1)
    assert frame.select(new[1:]).null_count().row(0) == (2, 2, 2, 2)


def test_a_bench_report_newer_than_this_pomt_is_refused(bench_file, tmp_path):
    stored, _ = read_bench(bench_file)
    data = json.loads(pl.read_parquet_metadata(bench_file)["pomt"])
    newer = tmp_path / "v9.parquet"
    stored.write_parquet(newer, metadata={"pomt": json.dumps({**data, "format_version": 9})})
    with pytest.raises(PomtError, match="format 9, newer than this pomt reads"):
        read_bench(newer)
