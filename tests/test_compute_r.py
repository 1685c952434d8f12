"""`pomt compute-r` and its library, on synthetic profiles whose answers are known by hand.

The profiles (conftest.py: LAT_B1, LAT_B4, ACC) have latency steps where the utility must
jump and an accuracy that falls slowly and then fast. N = 17, as in the tiny test ViT.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl
import pytest

from conftest import ACC, GEOMETRY, LAT_B1, LAT_B4, MODEL, N, run_in_process, write_accuracy, write_latency
from pomt_cli.cli.compute_r import selection_settings
from pomt_cli.errors import PomtError
from pomt_cli.formats.outputs import output_stem
from pomt_cli.formats.common import ProfileMeta, write_profile
from pomt_cli.formats.report import read_report, write_report
from pomt_cli.selection import common_points, compute_r, merge_unpruned, rank, score, utility

def points(latency: dict[int, float]) -> pl.DataFrame:
    return pl.DataFrame({"tokens": list(latency), "latency_ms": list(latency.values()),
                         "accuracy": [ACC[n] for n in latency]})


# Library


def test_utility_by_hand():
    u = utility(pl.Series([10.0, 5.0, 4.0]), pl.Series([80.0, 60.0, 20.0]), alpha=0.5)
    assert u.to_list() == pytest.approx([0.5, 0.5 * 0.5 + 0.5 * 0.75, 0.5 * 0.6 + 0.5 * 0.25])
    assert utility(pl.Series([10.0, 5.0]), pl.Series([80.0, 60.0]), alpha=1.0).to_list() == pytest.approx([0, 0.5])
    assert utility(pl.Series([10.0, 5.0]), pl.Series([80.0, 60.0]), alpha=0.0).to_list() == pytest.approx([1, 0.75])


def test_score_columns_by_hand():
    scored = score(points(LAT_B4), N, alpha=0.5)
    row = scored.filter(pl.col("tokens") == 13).row(0, named=True)
    assert row["R"] == 4
    assert row["latency_saved_pct"] == pytest.approx(48.0)
    assert row["accuracy_lost"] == pytest.approx(2.0)
    assert row["utility"] == pytest.approx(0.5 * 0.48 + 0.5 * 78 / 80)
    assert scored["tokens"].to_list() == sorted(LAT_B4, reverse=True)


def test_argmax_picks_the_step():
    settings = selection_settings()
    ranked = rank(score(points(LAT_B4), N, settings.alpha), settings, batch_size=4)
    assert ranked["tokens"].head(3).to_list() == [13, 11, 9]  # 0.7275, 0.6875, 0.635
    ranked = rank(score(points(LAT_B1), N, settings.alpha), settings, batch_size=1)
    assert ranked["tokens"][0] == 9


def test_utility_ties_go_to_the_larger_n():
    frame = pl.DataFrame({"tokens": [5, 17, 9], "latency_ms": [5.0, 10.0, 8.0], "accuracy": [40.0, 80.0, 60.0]})
    # U(17) = 0 + 0.5 * 1 = 0.5; U(5) = 0.5 * 0.5 + 0.5 * 0.5 = 0.5; U(9) = 0.1 + 0.375 = 0.475.
    settings = selection_settings(alpha=0.5)
    assert rank(score(frame, N, 0.5), settings, 1)["tokens"].to_list() == [17, 5, 9]


def test_utilities_one_rounding_apart_tie_and_the_larger_n_wins():
    # Both utilities are 0.5 exactly; in floating point U(5) comes out 1.1e-16 above U(17).
    frame = pl.DataFrame({"tokens": [17, 5, 9], "latency_ms": [7.3, 3.0, 6.0],
                          "accuracy": [79.1, 32.5068493150685, 40.0]})
    scored = score(frame, N, 0.5)
    u17, u5 = (scored.filter(pl.col("tokens") == n)["utility"].item() for n in (17, 5))
    assert u5 != u17 and abs(u5 - u17) < 1e-12
    assert rank(scored, selection_settings(alpha=0.5), 1)["tokens"].to_list() == [17, 5, 9]


@pytest.mark.parametrize("budget, expected", [(6.0, 13), (9.9, 15), (10.0, 15), (4.5, 5), (4.213, 3)])
def test_latency_budget_picks_the_most_accurate_feasible_n(budget, expected):
    settings = selection_settings(latency_budget_ms=budget)
    assert rank(score(points(LAT_B4), N, settings.alpha), settings, 4)["tokens"][0] == expected


def test_infeasible_latency_budget_names_the_nearest_feasible_value():
    settings = selection_settings(latency_budget_ms=1.0)
    with pytest.raises(PomtError) as info:
        rank(score(points(LAT_B4), N, settings.alpha), settings, 4)
    assert str(info.value) == ("no n meets --latency-budget 1 ms at batch 4: the fastest point is n=3 at 4.21 ms; "
                               "give at least 4.22")
    # The suggested value is feasible.
    settings = selection_settings(latency_budget_ms=4.22)
    assert rank(score(points(LAT_B4), N, settings.alpha), settings, 4)["tokens"][0] == 3


def test_an_infeasible_budget_suggests_the_fastest_latency_itself_when_it_shows_exactly():
    frame = pl.DataFrame({"tokens": [17, 13], "latency_ms": [10.0, 4.22], "accuracy": [80.0, 78.0]})
    with pytest.raises(PomtError, match=r"the fastest point is n=13 at 4\.22 ms; give at least 4\.22$"):
        rank(score(frame, N, 0.5), selection_settings(latency_budget_ms=1.0), 1)


@pytest.mark.parametrize("drop, expected", [(0.0, 15), (2.0, 13), (10.0, 11), (100.0, 3)])
def test_max_accuracy_drop_picks_the_fastest_n_within_the_drop(drop, expected):
    settings = selection_settings(max_accuracy_drop=drop)
    assert rank(score(points(LAT_B4), N, settings.alpha), settings, 4)["tokens"][0] == expected


def test_max_accuracy_drop_breaks_a_latency_tie_by_the_higher_accuracy():
    frame = pl.DataFrame({"tokens": [17, 13, 11], "latency_ms": [10.0, 6.0, 6.0], "accuracy": [80.0, 75.0, 78.0]})
    # n = 13 and n = 11 are equally fast; n = 11 keeps more accuracy (78 > 75), so it comes first.
    ranked = rank(score(frame, N, 0.5), selection_settings(max_accuracy_drop=10.0), 1)
    assert ranked["tokens"].to_list() == [11, 13, 17]


def test_max_accuracy_drop_given_to_the_displayed_precision_is_met_despite_rounding():
    frame = pl.DataFrame({"tokens": [17, 13], "latency_ms": [10.0, 6.0], "accuracy": [70.2, 70.1]})
    # 70.2 - 0.1 is 70.10000000000001 in floating point: n = 13 (70.1) loses exactly 0.1 and qualifies.
    assert 70.2 - 0.1 > 70.1
    ranked = rank(score(frame, N, 0.5), selection_settings(max_accuracy_drop=0.1), 1)
    assert ranked["tokens"][0] == 13


def test_a_point_measured_twice_counts_with_its_last_row():
    latency = pl.DataFrame({"batch_size": [1, 1, 1, 1], "tokens": [17, 13, 9, 13], "status": ["ok"] * 4,
                            "latency_ms": [10.0, 8.0, 5.0, 6.0]})
    accuracy = pl.DataFrame({"tokens": [17, 13, 9, 13], "accuracy": [80.0, 70.0, 60.0, 75.0]})
    common = common_points(latency, accuracy, 1, Path("lat.parquet"), Path("acc.parquet"))
    # n = 13 appears twice in both profiles: the later row (6.0 ms, 75%) replaces the earlier one.
    assert common.select("tokens", "latency_ms", "accuracy").rows() == [(17, 10.0, 80.0), (13, 6.0, 75.0),
                                                                         (9, 5.0, 60.0)]


def test_the_unpruned_point_of_several_layers_is_their_median_not_their_mean():
    frame = pl.DataFrame({"tokens": [17, 17, 17, 13], "latency_ms": [10.0, 11.0, 15.0, 6.0],
                          "accuracy": [80.0, 80.0, 80.0, 70.0], "layer": [2, 0, 1, 0],
                          "ci_low_ms": [9.0, 10.5, 14.0, 5.0], "ci_high_ms": [10.2, 11.1, 18.0, 6.5]})
    merged = merge_unpruned(frame, N, 1, Path("lat.parquet"))
    # Medians of (10, 11, 15), (9, 10.5, 14) and (10.2, 11.1, 18); the means would be 12, 11.17, 13.1.
    # The merged row keeps the first layer (0); the pruned point follows unchanged.
    assert merged.select("tokens", "layer", "latency_ms", "ci_low_ms", "ci_high_ms").rows() == [
        (17, 0, 11.0, 10.5, 11.1), (13, 0, 6.0, 5.0, 6.5)]


@pytest.mark.parametrize("kwargs, message", [
    ({"alpha": 1.5}, "--alpha 1.5 must lie between 0 and 1"),
    ({"alpha": -0.1}, "--alpha -0.1 must lie between 0 and 1"),
    ({"alpha": 0.5, "latency_budget_ms": 3.0}, "--alpha and --latency-budget are different ways"),
    ({"latency_budget_ms": 3.0, "max_accuracy_drop": 1.0}, "--latency-budget and --max-accuracy-drop"),
    ({"max_accuracy_drop": -1.0}, "--max-accuracy-drop -1.0 must be at least 0"),
    ({"latency_budget_ms": 0.0}, "--latency-budget 0.0 must be a positive"),
])
def test_settings_refuse_bad_options(kwargs, message):
    with pytest.raises(PomtError, match=message):
        selection_settings(**kwargs)


def test_one_r_per_batch_size_and_the_filter(profiles):
    lat, acc = profiles
    selection = compute_r(lat, acc, selection_settings())
    report = selection.report
    assert [(c.batch_size, c.tokens, c.R) for c in report.choices] == [(1, 9, 8), (4, 13, 4)]
    assert (report.batch_size, report.tokens, report.R) == (1, 9, 8)
    # Only the latency grid's points are used, though the accuracy grid is finer.
    assert selection.curves[4]["tokens"].to_list() == sorted(LAT_B4, reverse=True)
    assert len(selection.candidates[4]) == len(LAT_B4)
    only4 = compute_r(lat, acc, selection_settings(), batch_sizes=[4]).report
    assert [(c.batch_size, c.R) for c in only4.choices] == [(4, 4)]
    assert (only4.batch_size, only4.R) == (4, 4)
    with pytest.raises(PomtError, match=r"--batch-size 8 is not in .*lat.parquet \(it has batch size\(s\) 1, 4\)"):
        compute_r(lat, acc, selection_settings(), batch_sizes=[8])


def test_out_of_memory_points_are_left_out_and_the_reference_moves(tmp_path):
    curve = dict(LAT_B4)
    curve[17] = None  # out of memory: 15 becomes the reference
    lat = write_latency(tmp_path / "lat.parquet", {4: curve})
    acc = write_accuracy(tmp_path / "acc.parquet")
    choice = compute_r(lat, acc, selection_settings(max_accuracy_drop=0.0)).report.choices[0]
    assert choice.reference_tokens == 15
    assert choice.tokens == 15 and choice.latency_saved_pct == 0.0
    choice = compute_r(lat, acc, selection_settings()).report.choices[0]
    assert choice.latency_saved_pct == pytest.approx(100 * (1 - 5.2 / 9.8))


def test_allowed_differences_are_noted_and_inputs_recorded(profiles):
    lat, acc = profiles
    report = compute_r(lat, acc, selection_settings()).report
    notes = " | ".join(report.notes)
    assert "float16" in notes and "float32" in notes
    assert "different machines" in notes and "board" in notes
    assert "accuracy estimated on cpu" in notes
    assert report.latency.path == str(lat.resolve()) and report.accuracy.path == str(acc.resolve())
    assert len(report.latency.sha256) == 64 and report.latency.sha256 != report.accuracy.sha256
    assert report.latency.device_preset == "orin" and report.accuracy.estimator == "random"


@pytest.mark.parametrize("field, value", [("model", "deit_tiny_patch16_224"), ("num_tokens", 18),
                                          ("num_prefix", 2), ("num_blocks", 12), ("embed_dim", 192)])
def test_profiles_of_different_geometry_are_refused(tmp_path, field, value):
    lat = write_latency(tmp_path / "lat.parquet")
    # Down to n = 3: num_prefix 2 leaves n = 2 no patch token.
    acc = write_accuracy(tmp_path / "acc.parquet", {n: a for n, a in ACC.items() if n >= 3}, **{field: value})
    with pytest.raises(PomtError, match=f"describe different models \\({field} "):
        compute_r(lat, acc, selection_settings())


def test_too_few_common_points_names_both_counts(tmp_path):
    lat = write_latency(tmp_path / "lat.parquet", {4: {17: 10.0, 15: 9.0, 13: 5.0}})
    acc = write_accuracy(tmp_path / "acc.parquet", {16: 80.0, 15: 79.0, 14: 78.0, 12: 70.0})
    with pytest.raises(PomtError) as info:
        compute_r(lat, acc, selection_settings())
    message = str(info.value)
    assert "1 grid point(s) in common at batch 4" in message
    assert "3 measured point(s), the accuracy profile 4" in message


def test_report_round_trip_and_model_check(tmp_path, profiles):
    lat, acc = profiles
    report = compute_r(lat, acc, selection_settings(latency_budget_ms=6.0)).report
    path = write_report(report, tmp_path / "r.json")
    again = read_report(path, model=MODEL)
    assert again == report
    assert again.criterion == "latency_budget" and again.latency_budget_ms == 6.0
    assert again.choice_for(4).tokens == 13 and again.choice_for(8) is None
    with pytest.raises(PomtError, match=f"r.json was computed for {MODEL}, not deit_small_patch16_224: "):
        read_report(path, model="deit_small_patch16_224")
    with pytest.raises(PomtError, match="does not exist"):
        read_report(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PomtError, match="not readable JSON"):
        read_report(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"kind": "bench"}))
    with pytest.raises(PomtError, match="not a pomt compute-r report"):
        read_report(tmp_path / "other.json")
    damaged = json.loads(path.read_text())
    del damaged["choices"]
    (tmp_path / "damaged.json").write_text(json.dumps(damaged))
    with pytest.raises(PomtError, match="damaged \\(choices"):
        read_report(tmp_path / "damaged.json")


# CLI




# POMT's own latency and accuracy at layers 0 and 2 (N = 17): (layer, n) -> (ms, upper end of its interval).
LAYERED_LAT = {
    4: {(0, 17): 10.0, (0, 13): 6.0, (0, 9): 4.0, (2, 17): 10.2, (2, 13): 9.0, (2, 9): 8.5},
    # Nothing pays at batch 1; layer 2 at n = 9 is faster by its median but not beyond its interval.
    1: {(0, 17): 1.0, (0, 13): 1.1, (0, 9): 1.05, (2, 17): 1.0, (2, 13): 1.2, (2, 9): 0.98},
}
LAYERED_ACC = {(0, 17): 80.0, (0, 13): 70.0, (0, 9): 40.0, (2, 17): 80.0, (2, 13): 79.0, (2, 9): 78.0}


def write_layered(folder: Path, layers_in_accuracy: bool = True,
                  ci_low: float | None = None) -> tuple[Path, Path]:
    """A pomt-workload latency profile and a POMT accuracy profile at layers 0 and 2.

    ``ci_low``: each point's interval starts this far below its latency (default: no lower end).
    """
    rows = [{"batch_size": b, "tokens": n, "latency_ms": ms, "p10_ms": ms, "p90_ms": ms, "samples": 20,
             "status": "ok", "ci_high_ms": ms + (0.05 if (b, layer, n) == (1, 2, 9) else 0.001), "layer": layer,
             **({} if ci_low is None else {"ci_low_ms": ms - ci_low})}
            for b, curve in LAYERED_LAT.items() for (layer, n), ms in curve.items()]
    lat_meta = {**GEOMETRY, "dtype": "float32", "grid": [17, 13, 9], "batch_sizes": [4, 1], "device_preset": "cpu",
                "torch_device": "cpu", "timing_mode": "eager", "host": "h", "workload": "pomt", "layers": [0, 2]}
    lat = write_profile(folder / "lat.parquet", pl.DataFrame(rows), ProfileMeta(kind="latency", **lat_meta))
    # Without layers: one row per n (layer 0's accuracy), as estimate-accuracy writes it.
    points = LAYERED_ACC if layers_in_accuracy else {(None, n): a for (layer, n), a in LAYERED_ACC.items()
                                                     if layer == 0}
    acc_frame = pl.DataFrame({"tokens": [n for _, n in points], "accuracy": list(points.values()),
                              "top5": [100.0] * len(points), "images": [100] * len(points),
                              "layer": [layer for layer, _ in points]},
                             schema_overrides={"layer": pl.Int64})
    acc_meta = {**GEOMETRY, "dtype": "float32", "grid": [17, 13, 9], "estimator": "pomt", "weights": "random",
                "weights_sha256": "0" * 64, "data": "d", "num_images": 100, "num_classes": 10, "device_type": "cpu",
                "host": "h"}
    acc = write_profile(folder / "acc.parquet", acc_frame, ProfileMeta(kind="accuracy", **acc_meta))
    return lat, acc


def test_layer_and_r_are_chosen_together_and_r0_when_nothing_pays(tmp_path):
    lat, acc = write_layered(tmp_path)
    selection = compute_r(lat, acc, selection_settings())
    report = selection.report
    b4, b1 = report.choices
    assert (b4.batch_size, b4.layer, b4.R, b4.tokens, b4.workload) == (4, 0, 4, 13, "pomt")
    # The unpruned model's latency is the median of every layer's n = N point.
    assert b4.reference_ms == pytest.approx(10.1) and b4.latency_ms == 6.0 and b4.pays
    assert b4.latency_saved_pct == pytest.approx(100 * (1 - 6.0 / 10.1))
    assert (b1.R, b1.tokens, b1.pays, b1.latency_ms) == (0, 17, False, 1.0)
    assert any("batch 1: pruning does not pay here" in note for note in report.notes)
    assert report.workload == "pomt" and report.layers == [0, 2] and report.layer == 0
    # Layer 2's n = N row is merged into the unpruned one; all other points are scored.
    assert selection.curves[4].select("layer", "tokens").rows() == [(0, 17), (0, 13), (2, 13), (0, 9), (2, 9)]
    # The fastest pruned point within 2 points of accuracy: layer 2 keeps 9 of 17 tokens.
    drop = compute_r(lat, acc, selection_settings(max_accuracy_drop=2.0)).report.choices[0]
    assert (drop.layer, drop.R) == (2, 8)


def test_a_point_whose_interval_reaches_the_unpruned_latency_does_not_pay(tmp_path):
    # n = 13's interval ends at 10.0 ms, the unpruned latency itself: it is not faster beyond its
    # interval, so only n = 9 (interval up to 9.1 ms) may compete with R = 0.
    curve = {17: (10.0, 9.9, 10.1), 13: (8.0, 7.5, 10.0), 9: (9.0, 8.9, 9.1)}
    rows = [{"batch_size": 1, "tokens": n, "latency_ms": ms, "p10_ms": ms, "p90_ms": ms, "samples": 20,
             "status": "ok", "ci_low_ms": low, "ci_high_ms": high} for n, (ms, low, high) in curve.items()]
    meta = {**GEOMETRY, "dtype": "float32", "grid": [17, 13, 9], "batch_sizes": [1], "device_preset": "cpu",
            "torch_device": "cpu", "timing_mode": "eager", "host": "h"}
    lat = write_profile(tmp_path / "lat.parquet", pl.DataFrame(rows), ProfileMeta(kind="latency", **meta))
    acc = write_accuracy(tmp_path / "acc.parquet", {17: 80.0, 13: 79.0, 9: 70.0}, host="h")
    choice = compute_r(lat, acc, selection_settings()).report.choices[0]
    # U(17) = 0.5; U(9) = 0.5 * 0.1 + 0.5 * 70 / 80 = 0.4875; n = 13's 0.59375 would win were it a candidate.
    assert (choice.R, choice.tokens, choice.pays) == (0, 17, True)


def test_the_choice_carries_its_saving_as_a_ratio_to_the_same_curve(tmp_path):
    lat, acc = write_layered(tmp_path)
    b4, b1 = compute_r(lat, acc, selection_settings()).report.choices
    # Layer 0 at n = 13 over layer 0 at n = N (not the 10.1 ms median of both layers).
    assert (b4.layer, b4.tokens, b4.latency_ratio, b4.unpruned_ms) == (0, 13, 6.0 / 10.0, 10.0)
    assert b4.latency_ratio_low is None and b4.latency_ratio_high is None  # no ci_low_ms in the profile
    # R = 0 is the unpruned model itself: nothing is predicted beyond it.
    assert (b1.R, b1.latency_ratio, b1.unpruned_ms, b1.latency_ratio_low) == (0, 1.0, 1.0, None)
    (tmp_path / "ci").mkdir()
    lat, acc = write_layered(tmp_path / "ci", ci_low=0.5)
    b4 = compute_r(lat, acc, selection_settings()).report.choices[0]
    # ci_low(n*) / ci_high(N) to ci_high(n*) / ci_low(N): 5.5 / 10.001 to 6.001 / 9.5.
    assert b4.latency_ratio == 0.6
    assert b4.latency_ratio_low == pytest.approx(0.5499450055) and b4.latency_ratio_high == pytest.approx(0.6316842105)
    assert b4.ratio == 0.6


def test_the_table_names_the_unpruned_latency_its_saving_is_against(tmp_path, capsys):
    """With layers, the table's saving is against the median of the layers' n = N points and the
    R line's against the chosen layer's own: both are named, and R = 0 has no layer."""
    lat, acc = write_layered(tmp_path)
    code, out, err = run_in_process(["compute-r", "--latency", str(lat), "--accuracy", str(acc), "--output-dir",
                                     str(tmp_path / "r"), "--batch-size", "4"], capsys)
    assert code == 0, err
    text = " ".join(out.split())
    assert "R = 4 at layer 0 (n* = 13 of 17 tokens kept) at batch 4: predicted 6.000 ms, 40.0% less than the " \
           "unpruned model (10.000 ms)" in text
    assert ("saved vs unpruned: against 10.100 ms, the median of every layer's n = 17 point; the R line above: "
            "against layer 0's own, 10.000 ms") in text
    assert "│ 0 │ 13 │ 4 │ 6.000 │ 40.6% │" in text
    assert "│ - │ 17 │ 0 │ 10.100 │ 0.0% │" in text
    code, out, err = run_in_process(["compute-r", "--latency", str(lat), "--accuracy", str(acc), "--output-dir",
                                     str(tmp_path / "r1"), "--batch-size", "1"], capsys)
    assert code == 0, err
    assert ("R = 0 (n* = 17 of 17 tokens kept) at batch 1: pruning does not pay here: no pruned point is faster "
            "than the unpruned model") in " ".join(out.split()) and "beyond both intervals" in " ".join(out.split())
    # Said once, on the R line: not again as a note.
    assert " ".join(out.split()).count("pruning does not pay here") == 1


def test_an_unpruned_choice_that_pays_claims_no_saving(tmp_path, capsys):
    # With alpha = 0 only accuracy counts: the unpruned model wins although pruned points are faster.
    lat, acc = write_layered(tmp_path)
    code, out, err = run_in_process(["compute-r", "--latency", str(lat), "--accuracy", str(acc), "--output-dir",
                                     str(tmp_path / "r"), "--batch-size", "4", "--alpha", "0"], capsys)
    assert code == 0, err
    line = " ".join(out.split("Best candidates")[0].split()).split(" note: ")[0]
    assert line == ("R = 0 (n* = 17 of 17 tokens kept) at batch 4: no pruning: the unpruned model (10.100 ms) "
                    "scores best (largest utility)")


def test_one_profile_with_layers_and_one_without_is_refused(tmp_path):
    lat, acc = write_layered(tmp_path, layers_in_accuracy=False)
    with pytest.raises(PomtError, match="estimate accuracy with --estimator pomt --layer 0,2 so that both"):
        compute_r(lat, acc, selection_settings())
    proxy = write_latency(tmp_path / "proxy.parquet")
    (tmp_path / "again").mkdir()
    _, layered = write_layered(tmp_path / "again")
    with pytest.raises(PomtError, match="profile latency with --method pomt --layer 0,2 so that both"):
        compute_r(proxy, layered, selection_settings())


def test_a_report_of_format_1_is_read_as_the_proxy(tmp_path, profiles):
    lat, acc = profiles
    data = json.loads(compute_r(lat, acc, selection_settings()).report.model_dump_json())
    data["format_version"] = 1
    for key in ("layer", "workload", "layers"):
        del data[key]
    for choice in data["choices"]:
        for key in ("layer", "workload", "reference_ms", "pays", "latency_ratio", "latency_ratio_low",
                    "latency_ratio_high", "unpruned_ms"):
            del choice[key]
    (tmp_path / "v1.json").write_text(json.dumps(data))
    old = read_report(tmp_path / "v1.json")
    assert old.workload == "proxy" and old.choices[0].layer is None and old.choices[0].pays
    # Before version 3 a report has no ratio: bench takes 1 - latency_saved_pct / 100 (2 / 4 at batch 1).
    assert old.choices[0].latency_ratio is None and old.choices[0].ratio == 0.5


def test_a_report_of_format_2_is_read_without_the_ratio(tmp_path):
    lat, acc = write_layered(tmp_path)
    data = json.loads(compute_r(lat, acc, selection_settings()).report.model_dump_json())
    data["format_version"] = 2
    for choice in data["choices"]:
        for key in ("latency_ratio", "latency_ratio_low", "latency_ratio_high", "unpruned_ms"):
            del choice[key]
    (tmp_path / "v2.json").write_text(json.dumps(data))
    b4, b1 = read_report(tmp_path / "v2.json").choices
    assert b4.latency_ratio is None and b4.ratio == pytest.approx(6.0 / 10.1) and b1.ratio == 1.0


def assert_refused(code: int, stderr: str, out_dir: Path, message: str) -> None:
    """Exit code 2, one line starting with ``error:`` that contains ``message``, nothing written."""
    assert code == 2, stderr
    assert stderr.startswith("error:"), stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "Traceback" not in stderr
    assert message in stderr, stderr
    assert not out_dir.exists()


def test_cli_happy_path(tmp_path, profiles, pomt):
    lat, acc = profiles
    out_dir = tmp_path / "runs"
    proc = pomt("compute-r", "--latency", str(lat), "--accuracy", str(acc), "--output-dir", str(out_dir))
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert text.startswith(
        "R = 8 (n* = 9 of 17 tokens kept) at batch 1: predicted 2.000 ms, 50.0% less than the unpruned model "
        "(4.000 ms), by the all-blocks proxy: the real saving will be smaller "
        "R = 4 (n* = 13 of 17 tokens kept) at batch 4: predicted 5.200 ms, 48.0% less")
    assert "note: latency comes from the all-blocks proxy" in text
    assert "note: latency was measured in float16" in proc.stdout
    assert "Best candidates at batch 4" in proc.stdout
    stem = output_stem("compute_r", MODEL, device="orin", batch_size=[1, 4], dtype="float16")
    report_path, png = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    assert png.is_file() and png.read_bytes().startswith(b"\x89PNG")
    data = json.loads(report_path.read_text())
    assert data["kind"] == "compute_r" and data["format_version"] == 4
    assert (data["model"], data["num_tokens"], data["num_prefix"], data["num_blocks"], data["embed_dim"]) == (
        MODEL, 17, 1, 3, 48)
    assert data["criterion"] == "utility" and data["alpha"] == 0.5
    assert (data["R"], data["tokens"], data["batch_size"]) == (8, 9, 1)
    b4 = data["choices"][1]
    assert b4["batch_size"] == 4 and b4["R"] == 4 and b4["tokens"] == 13
    assert b4["latency_ms"] == 5.2 and b4["accuracy"] == 78.0
    assert b4["latency_saved_pct"] == pytest.approx(48.0) and b4["accuracy_lost"] == pytest.approx(2.0)
    assert b4["utility"] == pytest.approx(0.7275)
    assert data["latency"]["path"] == str(lat.resolve()) and len(data["latency"]["sha256"]) == 64
    assert data["latency"]["device_preset"] == "orin" and data["accuracy"]["estimator"] == "random"
    assert data["command"].startswith("pomt compute-r") and data["created"] and data["pomt_version"]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([report_path.name, png.name])


def test_cli_budget_modes_and_batch_filter(tmp_path, profiles, capsys):
    lat, acc = profiles
    out_dir = tmp_path / "runs"
    base = ["compute-r", "--latency", str(lat), "--accuracy", str(acc), "--output-dir", str(out_dir)]
    code, out, err = run_in_process([*base, "--latency-budget", "6", "--batch-size", "4"], capsys)
    assert code == 0, err
    assert out.splitlines()[0].startswith("R = 4 (n* = 13 of 17 tokens kept) at batch 4: predicted 5.200 ms")
    stem = output_stem("compute_r", MODEL, device="orin", batch_size=[4], dtype="float16")
    data = json.loads((out_dir / f"{stem}.json").read_text())
    assert data["criterion"] == "latency_budget" and data["latency_budget_ms"] == 6.0 and len(data["choices"]) == 1
    code, out, err = run_in_process([*base, "--max-accuracy-drop", "10", "--batch-size", "4"], capsys)
    assert code == 0, err
    assert out.splitlines()[0].startswith("R = 6 (n* = 11 of 17 tokens kept) at batch 4: predicted")
    code, out, err = run_in_process([*base, "--alpha", "0", "--batch-size", "4"], capsys)
    assert code == 0, err
    assert out.splitlines()[0].startswith("R = 0 (n* = 17 of 17 tokens kept) at batch 4: ")  # accuracy only; tie 17/15


def test_reports_of_profiles_at_another_input_size_or_of_graph_replays_keep_their_own_names(tmp_path, capsys):
    # Three profiles of one model, device, batch size and dtype: the default input size in
    # eager mode, --img-size 256, and CUDA graph replays. Each report gets its own file, so
    # that the second and third do not overwrite the first.
    acc = write_accuracy(tmp_path / "acc.parquet")
    profiles = {
        "eager": write_latency(tmp_path / "eager.parquet"),
        "img": write_latency(tmp_path / "img.parquet", img_size_option=256),
        "graphs": write_latency(tmp_path / "graphs.parquet", timing_mode="cuda_graphs"),
    }
    out_dir = tmp_path / "runs"
    for lat in profiles.values():
        code, _, err = run_in_process(["compute-r", "--latency", str(lat), "--accuracy", str(acc),
                                       "--output-dir", str(out_dir)], capsys)
        assert code == 0, err
    base = output_stem("compute_r", MODEL, device="orin", batch_size=[1, 4], dtype="float16")
    assert base == f"compute_r_{MODEL.replace('_', '-')}_orin_bs1-4_float16"
    names = {"eager": base, "img": f"{base}_img256", "graphs": f"{base}_cudagraphs"}
    assert sorted(p.name for p in out_dir.glob("*.json")) == sorted(f"{n}.json" for n in names.values())
    for kind, stem in names.items():
        latency = json.loads((out_dir / f"{stem}.json").read_text())["latency"]
        assert latency["path"] == str(profiles[kind].resolve())


def test_reports_of_another_workload_layers_or_estimator_keep_their_own_names(tmp_path, capsys):
    # One device, batch sizes and dtype: the POMT workload at layers 0 and 2, the proxy with
    # the random estimator, and the proxy with the topk estimator. A proxy run must not
    # overwrite a (refined) POMT report in the same folder, nor one estimator the other.
    lat, acc = write_layered(tmp_path)
    proxy = write_latency(tmp_path / "proxy.parquet", {4: LAT_B4, 1: LAT_B1}, device_preset="cpu", dtype="float32")
    pairs = {"pomt": (lat, acc), "random": (proxy, write_accuracy(tmp_path / "random.parquet")),
             "topk": (proxy, write_accuracy(tmp_path / "topk.parquet", estimator="topk"))}
    out_dir = tmp_path / "runs"
    for latency, accuracy in pairs.values():
        code, _, err = run_in_process(["compute-r", "--latency", str(latency), "--accuracy", str(accuracy),
                                       "--output-dir", str(out_dir)], capsys)
        assert code == 0, err
    base = f"compute_r_{MODEL.replace('_', '-')}_cpu_bs4-1_float32"
    names = {"pomt": f"{base}_pomt-layers0-2", "random": base, "topk": f"{base}_acc-topk"}
    assert sorted(p.name for p in out_dir.glob("*.json")) == sorted(f"{n}.json" for n in names.values())
    for kind, stem in names.items():
        report = read_report(out_dir / f"{stem}.json")
        assert report.accuracy.path == str(pairs[kind][1].resolve())
        assert report.workload == ("pomt" if kind == "pomt" else "proxy")
    # A report under an older name (without these parts) is still read when named.
    old = out_dir / f"{base}_old.json"
    old.write_bytes((out_dir / f"{names['pomt']}.json").read_bytes())
    assert read_report(old).layers == [0, 2]


def bad_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments after compute-r, a part of the expected message); profiles written."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    lat = write_latency(folder / "lat.parquet")
    acc = write_accuracy(folder / "acc.parquet")
    other = write_accuracy(folder / "other.parquet", model="deit_tiny_patch16_224")
    apart = write_accuracy(folder / "apart.parquet", {16: 80.0, 14: 79.0})
    corrupt = folder / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not a parquet file")
    a_file = folder / "a_file"
    a_file.write_text("x")
    both = ["--latency", str(lat), "--accuracy", str(acc)]
    (folder / "layered").mkdir()
    layered_lat, _ = write_layered(folder / "layered")
    return {
        "missing": (["--latency", str(folder / "nope.parquet"), "--accuracy", str(acc)], "does not exist"),
        "corrupt": (["--latency", str(lat), "--accuracy", str(corrupt)], "not a readable Parquet file"),
        "other model": (["--latency", str(lat), "--accuracy", str(other)], "describe different models"),
        "latency as accuracy": (["--latency", str(lat), "--accuracy", str(lat)],
                                "is a latency profile, but an accuracy profile is needed"),
        "accuracy as latency": (["--latency", str(acc), "--accuracy", str(acc)],
                                "is an accuracy profile, but a latency profile is needed"),
        "alpha": ([*both, "--alpha", "1.5"], "--alpha 1.5 must lie between 0 and 1"),
        "two modes": ([*both, "--alpha", "0.3", "--max-accuracy-drop", "1"], "give only one of them"),
        "no common points": (["--latency", str(lat), "--accuracy", str(apart)], "0 grid point(s) in common"),
        "infeasible budget": ([*both, "--latency-budget", "1.0", "--batch-size", "4"],
                              "no n meets --latency-budget 1 ms at batch 4: the fastest point is n=3 at 4.21 ms; "
                              "give at least 4.22"),
        "batch size": ([*both, "--batch-size", "8"], "--batch-size 8 is not in"),
        "unwritable": ([*both, "--output-dir", str(a_file / "runs")], "is a file, not a folder"),
        "layers on one side": (["--latency", str(layered_lat), "--accuracy", str(acc)],
                               "has no layers: estimate accuracy with --estimator pomt --layer 0,2"),
    }


def test_cli_bad_input_in_process(tmp_path, capsys):
    for name, (args, message) in bad_cases(tmp_path).items():
        out_dir = tmp_path / f"runs-{name.replace(' ', '-')}"
        if "--output-dir" not in args:
            args = [*args, "--output-dir", str(out_dir)]
        code, _, err = run_in_process(["compute-r", *args], capsys)
        assert_refused(code, err, out_dir, message)


@pytest.mark.parametrize("names", [("corrupt", "infeasible budget")])
def test_cli_bad_input_in_a_subprocess(tmp_path, pomt, names):
    cases = bad_cases(tmp_path)
    runs = {}
    for name in names:
        args, message = cases[name]
        out_dir = tmp_path / f"runs-{name.replace(' ', '-')}"
        if "--output-dir" not in args:
            args = [*args, "--output-dir", str(out_dir)]
        runs[name] = (["compute-r", *args], message, out_dir)
    with ThreadPoolExecutor(len(runs)) as pool:
        procs = dict(zip(runs, pool.map(lambda run: pomt(*run[0]), runs.values())))
    for name, proc in procs.items():
        _, message, out_dir = runs[name]
        assert_refused(proc.returncode, proc.stderr, out_dir, message)


# Finding the profiles in --output-dir


def test_the_newest_matching_pair_is_found(tmp_path):
    from pomt_cli.formats.lookup import find_profile_pair

    write_latency(tmp_path / "old_lat.parquet", created="2026-01-01T00:00:00+00:00")
    new_lat = write_latency(tmp_path / "new_lat.parquet", created="2026-01-02T00:00:00+00:00")
    write_latency(tmp_path / "unfinished.parquet", created="2026-01-03T00:00:00+00:00", complete=False)
    write_accuracy(tmp_path / "old_acc.parquet", created="2026-01-01T00:00:00+00:00")
    new_acc = write_accuracy(tmp_path / "new_acc.parquet", created="2026-01-02T00:00:00+00:00")
    (tmp_path / "other.parquet").write_bytes(b"not parquet")
    assert find_profile_pair(tmp_path) == (new_lat, new_acc)
    # One given: the newest of the other kind with its geometry.
    old = tmp_path / "old_lat.parquet"
    assert find_profile_pair(tmp_path, latency=old) == (old, new_acc)


def test_one_given_takes_the_newest_match_of_the_other_kind(tmp_path):
    from pomt_cli.formats.lookup import find_profile_pair

    lat = write_latency(tmp_path / "lat.parquet", created="2026-01-01T00:00:00+00:00")
    acc = write_accuracy(tmp_path / "acc.parquet", created="2026-01-01T00:00:00+00:00")
    write_accuracy(tmp_path / "newer_other_model.parquet", created="2026-01-05T00:00:00+00:00",
                   model="deit_tiny_patch16_224", num_tokens=197, embed_dim=192, num_blocks=12)
    assert find_profile_pair(tmp_path, latency=lat) == (lat, acc)


def test_no_match_lists_the_candidates(tmp_path, capsys):
    write_latency(tmp_path / "lat.parquet")
    write_accuracy(tmp_path / "acc_other.parquet", model="deit_tiny_patch16_224", num_tokens=197)
    code, out, err = run_in_process(["compute-r", "--output-dir", str(tmp_path)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "no latency profile matches an accuracy profile" in err
    assert "lat.parquet (vit_tiny_patch16_224, N=17)" in err and "acc_other.parquet (deit_tiny_patch16_224, N=197)" in err
    assert "--latency FILE" in err and not list(tmp_path.glob("*.json"))


def test_a_folder_with_only_an_interrupted_latency_profile_says_so(tmp_path, capsys):
    lat = write_latency(tmp_path / "lat.parquet", complete=False)
    write_accuracy(tmp_path / "acc.parquet")
    code, _, err = run_in_process(["compute-r", "--output-dir", str(tmp_path)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"the only latency profile(s) in {tmp_path} (--output-dir) were interrupted: {lat}: finish one" in err
    assert "--resume FILE" in err and "--latency FILE" in err and not list(tmp_path.glob("*.json"))
    # Named, it is read: compute-r chooses from the points it has.
    code, out, err = run_in_process(["compute-r", "--latency", str(lat), "--output-dir", str(tmp_path)], capsys)
    assert code == 0, err


def test_no_profile_at_all_says_what_to_run(tmp_path, capsys):
    write_accuracy(tmp_path / "acc.parquet")
    code, _, err = run_in_process(["compute-r", "--output-dir", str(tmp_path / "empty")], capsys)
    assert code == 2 and "no latency profile in" in err and "pomt profile" in err
    code, _, err = run_in_process(["compute-r", "--output-dir", str(tmp_path)], capsys)
    assert code == 2 and "no latency profile in" in err


def test_newest_profiles_that_disagree_are_ambiguous(tmp_path, capsys):
    write_latency(tmp_path / "lat.parquet", created="2026-01-01T00:00:00+00:00")
    write_accuracy(tmp_path / "acc.parquet", created="2026-01-01T00:00:00+00:00")
    write_accuracy(tmp_path / "acc_newer.parquet", created="2026-01-02T00:00:00+00:00",
                   model="deit_tiny_patch16_224", num_tokens=197)
    code, _, err = run_in_process(["compute-r", "--output-dir", str(tmp_path)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "newest latency and accuracy profiles are of different models" in err
    assert "acc_newer.parquet" in err and "acc.parquet" in err and "lat.parquet" in err
    # Naming one of them chooses.
    code, out, err = run_in_process(["compute-r", "--output-dir", str(tmp_path), "--latency",
                                     str(tmp_path / "lat.parquet")], capsys)
    assert code == 0, err
    assert out.splitlines()[0] == f"accuracy profile: {tmp_path / 'acc.parquet'} (the newest in {tmp_path} that matches)"


def test_compute_r_without_paths_uses_the_found_pair(tmp_path, capsys):
    write_latency(tmp_path / "lat.parquet")
    write_accuracy(tmp_path / "acc.parquet")
    code, out, err = run_in_process(["compute-r", "--output-dir", str(tmp_path)], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"latency profile: {tmp_path / 'lat.parquet'}")
    assert lines[1].startswith(f"accuracy profile: {tmp_path / 'acc.parquet'}")
    assert any(line.startswith("R = 4 (n* = 13 of 17 tokens kept) at batch 4") for line in lines)
    report = read_report(next(tmp_path.glob("compute_r_*.json")))
    assert Path(report.latency.path) == (tmp_path / "lat.parquet").resolve()


def test_a_choice_slower_than_its_own_layers_unpruned_point_says_more_not_a_negative_less():
    """With layers, a choice pays against the median of every layer's n = N point; on a noisy
    profile it can be slower than its own layer's. The R line then says how much more (it
    printed '-7.4% less than the unpruned model')."""
    from pomt_cli.cli.compute_r import r_line
    from pomt_cli.formats.report import Choice

    def choice(ratio: float, low: float | None = None, high: float | None = None) -> Choice:
        return Choice(batch_size=32, R=20, tokens=45, layer=0, workload="pomt", reference_tokens=65,
                      reference_ms=56.137, latency_ms=34.712, latency_saved_pct=38.2, accuracy=97.8,
                      accuracy_lost=0.66, utility=0.84, latency_ratio=ratio, latency_ratio_low=low,
                      latency_ratio_high=high, unpruned_ms=32.325)

    assert r_line(choice(1.074, 0.9, 1.3), 65) == (
        "R = 20 at layer 0 (n* = 45 of 65 tokens kept) at batch 32: predicted 34.712 ms, 7.4% more than the "
        "unpruned model (32.325 ms) (interval -10.0% to 30.0%), measured on the real pruned model")
    assert "predicted 34.712 ms, 20.0% less than the unpruned model (32.325 ms) (interval 10.0% to 30.0%)" in (
        r_line(choice(0.8, 0.7, 0.9), 65))
