"""Strict reading: values out of range, versions that are no integer, fields that contradict each other."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from conftest import run_in_process, write_accuracy, write_latency
from test_compute_r import write_layered

from pomt_cli.cli.compute_r import selection_settings
from pomt_cli.errors import PomtError
from pomt_cli.formats.accuracy import read_accuracy
from pomt_cli.formats.bench import read_bench
from pomt_cli.formats.latency import read_latency
from pomt_cli.formats.report import read_report, write_report
from pomt_cli.pipelines import RefineSettings, refine
from pomt_cli.selection import SelectionSettings, compute_r


def rewrite(path: Path, columns: dict | None = None, **meta) -> Path:
    """The profile at ``path`` with ``columns`` replaced and the metadata fields ``meta`` changed, in place."""
    data = json.loads(pl.read_parquet_metadata(path)["pomt"])
    pl.read_parquet(path).with_columns(**(columns or {})).write_parquet(
        path, metadata={"pomt": json.dumps({**data, **meta})})
    return path


def with_intervals(path: Path) -> Path:
    """The latency profile at ``path`` with every statistic pomt writes, in order around the median."""
    ms = pl.col("latency_ms")
    return rewrite(path, {"p10_ms": ms * 0.9, "p90_ms": ms * 1.2, "ci_low_ms": ms * 0.95, "ci_high_ms": ms * 1.05,
                          "min_ms": ms * 0.8, "max_ms": ms * 1.5, "visit_low_ms": ms * 0.97,
                          "visit_high_ms": ms * 1.02})


def test_statistics_in_order_read(tmp_path):
    frame, _ = read_latency(with_intervals(write_latency(tmp_path / "lat.parquet")))
    assert frame["ci_high_ms"].to_list() == pytest.approx([ms * 1.05 for ms in frame["latency_ms"]])


@pytest.mark.parametrize("columns, message", [
    ({"latency_ms": pl.lit(1e308)}, "column latency_ms is 1e\\+308, above 1e\\+09 ms in row 1"),
    ({"max_ms": pl.lit(2e9)}, "column max_ms is 2000000000.0, above 1e\\+09 ms"),
    ({"std_ms": pl.lit(1e300)}, "column std_ms is 1e\\+300, above 1e\\+09 ms"),
    ({"ci_low_ms": pl.col("ci_high_ms") * 2}, "column ci_low_ms is 8.4, above latency_ms 4.0, in row 1"),
    ({"ci_high_ms": pl.col("latency_ms") * 0.5}, "column latency_ms is 4.0, above ci_high_ms 2.0, in row 1"),
    ({"p10_ms": pl.col("p90_ms") * 2}, "column p10_ms is 9.6, above latency_ms 4.0"),
    ({"p90_ms": pl.col("latency_ms") / 2}, "column latency_ms is 4.0, above p90_ms 2.0"),
    ({"min_ms": pl.col("max_ms") * 2}, "column min_ms is 12.0, above p10_ms 3.6"),
    ({"visit_low_ms": pl.col("visit_high_ms") + 1}, "column visit_low_ms is 5.08, above visit_high_ms 4.08"),
])
def test_a_latency_out_of_range_or_out_of_order_is_damage(tmp_path, columns, message):
    lat = rewrite(with_intervals(write_latency(tmp_path / "lat.parquet")), columns)
    with pytest.raises(PomtError, match=f"{message}.*is it damaged\\? write it again with pomt"):
        read_latency(lat)


def test_a_huge_latency_is_one_line_in_compute_r(tmp_path, capsys):
    """It crashed in matplotlib's ticker (a 91-line traceback) while plotting the choice."""
    lat = rewrite(write_latency(tmp_path / "lat.parquet"), {"latency_ms": pl.lit(1e308), "p90_ms": pl.lit(1e308)})
    acc = write_accuracy(tmp_path / "acc.parquet")
    out = tmp_path / "out"
    code, _, err = run_in_process(["compute-r", "--latency", str(lat), "--accuracy", str(acc),
                                   "--output-dir", str(out)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and str(lat) in err and "above 1e+09 ms" in err
    assert not out.exists()


@pytest.mark.parametrize("columns, message", [
    ({"top5": pl.col("accuracy") - 1}, "column accuracy is 80.0, above top5 79.0, in row 1"),
    ({"correct": pl.lit(-1), "correct_top5": pl.lit(5)}, "column correct is -1, below 0"),
    ({"correct": pl.lit(3), "correct_top5": pl.lit(2)}, "column correct is 3, above correct_top5 2"),
    ({"correct": pl.lit(3), "correct_top5": pl.lit(1001)}, "column correct_top5 is 1001, above images 1000"),
])
def test_accuracy_counts_out_of_range_or_order_are_damage(tmp_path, columns, message):
    acc = rewrite(write_accuracy(tmp_path / "acc.parquet"), columns)
    with pytest.raises(PomtError, match=f"{message}.*write it again with pomt"):
        read_accuracy(acc)


NOT_A_VERSION = ["99", "2", 2.0, 99.5, True, 0, -1, None]


@pytest.mark.parametrize("version", NOT_A_VERSION)
@pytest.mark.parametrize("kind", ["latency", "accuracy"])
def test_a_profile_version_that_is_no_integer_from_1_is_damage(tmp_path, kind, version):
    path = (write_latency if kind == "latency" else write_accuracy)(tmp_path / "p.parquet")
    rewrite(path, format_version=version)
    with pytest.raises(PomtError, match=r"damaged pomt metadata \(field format_version"):
        (read_latency if kind == "latency" else read_accuracy)(path)


@pytest.fixture
def report_file(tmp_path) -> Path:
    """A compute-r report of the synthetic profiles (batch sizes 1 and 4, N = 17)."""
    lat, acc = write_latency(tmp_path / "lat.parquet"), write_accuracy(tmp_path / "acc.parquet")
    return write_report(compute_r(lat, acc, SelectionSettings()).report, tmp_path / "report.json")


def edit_report(path: Path, edit) -> Path:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("version", NOT_A_VERSION)
def test_a_report_version_that_is_no_integer_from_1_is_damage(report_file, version):
    edit_report(report_file, lambda d: d.update(format_version=version))
    with pytest.raises(PomtError, match=r"is damaged \(format_version: .*write it again with pomt compute-r"):
        read_report(report_file)


def test_a_report_of_a_newer_integer_version_asks_for_an_upgrade(report_file):
    edit_report(report_file, lambda d: d.update(format_version=99, choices="a new shape"))
    with pytest.raises(PomtError, match="format 99, newer than this pomt reads .*upgrade pomt"):
        read_report(report_file)


def test_a_report_of_version_1_still_reads(report_file):
    def v1(data: dict) -> None:
        data.update(format_version=1)
        for key in ("layer", "workload", "layers", "refine"):
            data.pop(key)
        for choice in data["choices"]:
            for key in ("layer", "workload", "reference_ms", "pays", "latency_ratio", "latency_ratio_low",
                        "latency_ratio_high", "unpruned_ms", "refined", "refined_ms", "refined_unpruned_ms"):
                choice.pop(key)
    report = read_report(edit_report(report_file, v1))
    assert report.format_version == 1 and report.workload == "proxy" and len(report.choices) == 2


def first_choice(**fields):
    return lambda data: data["choices"][0].update(fields)


@pytest.mark.parametrize("edit, message", [
    (first_choice(latency_ratio=1e300), r"choices.0.latency_ratio: Input should be less than 1000"),
    (first_choice(latency_ms=1e12), r"choices.0.latency_ms: Input should be less than or equal to 1000000000"),
    (first_choice(latency_saved_pct=-1e300), r"choices.0.latency_saved_pct: Input should be greater than"),
    (first_choice(R=2), r"the report: Value error, batch size 1: R 2 \+ tokens 9 is not num_tokens 17"),
    (first_choice(reference_tokens=99, R=0, tokens=17), r"reference_tokens 99 is above num_tokens 17"),
    (first_choice(reference_tokens=5), r"choices.0: Value error, tokens 9 is above reference_tokens 5"),
    (first_choice(latency_ratio_low=0.9, latency_ratio_high=0.8), r"latency_ratio_low 0.9 is above"),
    (lambda d: d["choices"].append(d["choices"][0]), r"batch size 1 has two choices"),
    (lambda d: d.update(criterion="latency_budget"), r"criterion latency_budget needs latency_budget_ms"),
    (lambda d: d.update(criterion="max_accuracy_drop"), r"criterion max_accuracy_drop needs max_accuracy_drop"),
    (lambda d: d.update(latency_budget_ms=5.0), r"latency_budget_ms is set, but the criterion is utility"),
    (lambda d: d.update(R=0, tokens=17), r"R 0, tokens 17, batch_size 1 are not the first choice's \(8, 9, 1\)"),
    (lambda d: d.update(num_tokens=197), r"batch size 1: R 8 \+ tokens 9 is not num_tokens 197"),
    (lambda d: d["latency"].update(dtype="int8"), r"latency.dtype: Input should be 'float32'"),
])
def test_a_report_that_contradicts_itself_is_damage(report_file, edit, message):
    assert [(c.batch_size, c.R, c.tokens, c.reference_tokens) for c in read_report(report_file).choices] == [
        (1, 8, 9, 17), (4, 4, 13, 17)]
    edit_report(report_file, edit)
    with pytest.raises(PomtError, match=f"report {report_file} is damaged \\(.*{message}"):
        read_report(report_file)


@pytest.mark.parametrize("field, value", [("model", "deit_tiny_patch16_224"), ("num_blocks", 12),
                                          ("embed_dim", 192), ("num_prefix", 2)])
def test_refine_refuses_a_report_of_another_model_than_its_latency_profile(tmp_path, field, value):
    lat, acc = write_layered(tmp_path)
    path = write_report(compute_r(lat, acc, selection_settings()).report, tmp_path / "report.json")
    edit_report(path, lambda d: d.update({field: value}))
    before = path.read_bytes()
    with pytest.raises(PomtError, match=f"{path} has {field} {value}, but the latency profile it names \\({lat}\\) "
                       "has .*: the report is damaged; run pomt compute-r again"):
        refine(RefineSettings(report=path))
    assert path.read_bytes() == before


@pytest.mark.parametrize("meta, message", [
    ({"dtype": "int8"}, r"field dtype: Input should be 'float32', 'float16' or 'bfloat16'"),
    ({"num_prefix": -1}, r"field num_prefix: Input should be greater than or equal to 0"),
    ({"num_prefix": 70}, r"num_prefix 70 is not below num_tokens 17"),
    ({"num_tokens": 10**8}, r"field num_tokens: Input should be less than or equal to 1000000"),
    ({"num_blocks": 0}, r"field num_blocks: Input should be greater than or equal to 1"),
    ({"batch_sizes": [7]}, r"has batch sizes 1, 4 in its rows, but its metadata lists 7"),
    ({"batch_sizes": []}, r"has batch sizes 1, 4 in its rows, but its metadata lists none"),
    ({"batch_sizes": [1, 4, 8]}, r"has batch sizes 1, 4 in its rows, but its metadata lists 1, 4, 8"),
    # Token counts beyond the model's, or rows the grid does not list.
    ({"num_tokens": 15}, r"grid holds n = 17, outside 2\.\.15 \(the model's 15 tokens, 1 of them prefix\)"),
    ({"grid": [17, 15, 40]}, r"grid holds n = 40, outside 2\.\.17"),
    ({"grid": [17, 15, 13]}, r"has rows at n = 3, 5, 7 and 2 more, which its grid \(3 points from 17 to 13\) does "
                             r"not list: is it damaged\?"),
    ({"grid": []}, r"has rows at n = 3, 5, 7 and 5 more, which its grid \(empty\) does not list"),
])
def test_latency_metadata_that_contradicts_the_rows_is_damage(tmp_path, meta, message):
    lat = rewrite(write_latency(tmp_path / "lat.parquet"), **meta)
    with pytest.raises(PomtError, match=f"{message}.*write it again with pomt"):
        read_latency(lat)


def test_an_interrupted_profile_may_lack_listed_batch_sizes_and_layers(tmp_path):
    lat, _ = write_layered(tmp_path)
    rewrite(lat, batch_sizes=[4, 1, 8], layers=[0, 2, 5], complete=False)
    frame, meta = read_latency(lat)
    assert meta.batch_sizes == [4, 1, 8] and sorted(set(frame["layer"])) == [0, 2]
    rewrite(lat, complete=True)
    with pytest.raises(PomtError, match="has batch sizes 1, 4 in its rows, but its metadata lists 4, 1, 8"):
        read_latency(lat)
    rewrite(lat, batch_sizes=[4, 1], layers=[5])
    with pytest.raises(PomtError, match="has layers 0, 2 in its rows, but its metadata lists 5"):
        read_latency(lat)


def test_accuracy_rows_must_lie_on_the_grid_within_the_models_tokens(tmp_path):
    acc = write_accuracy(tmp_path / "acc.parquet")
    rewrite(acc, grid=[17, 16])
    with pytest.raises(PomtError, match=r"has rows at n = 2, 3, 4 and 11 more, which its grid \(2 points from 17 "
                       r"to 16\) does not list"):
        read_accuracy(acc)
    rewrite(acc, num_tokens=9, grid=list(range(17, 1, -1)))
    with pytest.raises(PomtError, match=r"grid holds n = 17, outside 2\.\.9 .*write it again with pomt"):
        read_accuracy(acc)


def test_accuracy_layers_must_be_the_metadatas(tmp_path):
    _, acc = write_layered(tmp_path)
    rewrite(acc, layers=[0, 2])
    assert sorted(set(read_accuracy(acc)[0]["layer"])) == [0, 2]
    rewrite(acc, layers=[0])
    with pytest.raises(PomtError, match="has layers 0, 2 in its rows, but its metadata lists 0"):
        read_accuracy(acc)


@pytest.mark.parametrize("version, message", [
    ("5", r"damaged \(field format_version"), (5.0, r"damaged \(field format_version"),
    (0, r"damaged \(field format_version"), (False, r"damaged \(field format_version"),
    (6, "format 6, newer than this pomt reads"),
])
def test_a_bench_version_that_is_no_integer_from_1_is_damage(tmp_path, version, message):
    frame = pl.DataFrame({"batch_size": [1]})
    data = {"kind": "bench", "format_version": version, "dtype": "float32"}
    path = tmp_path / "bench.parquet"
    frame.write_parquet(path, metadata={"pomt": json.dumps(data)})
    with pytest.raises(PomtError, match=message):
        read_bench(path)


def test_a_bench_setting_has_a_layer_only_for_a_method_that_prunes_in_one_block():
    from pomt_cli.formats.bench import MethodSetting

    assert MethodSetting(method="pomt", r=4).layer == 3
    assert MethodSetting(method="pomt", r=4, layer=1).layer == 1
    for method in ("none", "tome", "topk"):
        setting = MethodSetting(method=method, r=0, layer=3)  # as bench files before 2026-11-28 recorded them
        assert setting.layer is None and setting.model_dump()["layer"] is None
