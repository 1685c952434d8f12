"""pomt bench: the methods side by side (tokens, latency bookkeeping, accuracy), its files and errors."""

from __future__ import annotations

import json
import random

import polars as pl
import pytest
import torch
from safetensors.torch import save_file

from conftest import image_folder, run_in_process, run_pomt, tiny_vit
from pomt_cli.bench import (
    BenchTiming,
    MethodSetting,
    Prediction,
    accuracy_of_methods,
    bench_frame,
    check_choices,
    check_settings,
    check_text,
    fit_settings,
    slower_than_none,
    time_methods,
)
from pomt_cli.accuracy.data import Preprocess, evaluate, list_images, load_images
from pomt_cli.errors import PomtError
from pomt_cli.formats.bench import read_bench
from pomt_cli.formats.report import Choice
from pomt_cli.measure.timing import Measurement
from pomt_cli.models import create_model, state_dict_sha256
from pomt_cli.pruning import apply, geometry, remove

FAST = BenchTiming(budget_s=0.05, min_samples=3, warmup=1, rounds=2)
SETTINGS = [MethodSetting(method="none"), MethodSetting(method="pomt", r=5, layer=1),
            MethodSetting(method="tome", r=2), MethodSetting(method="topk", r=[1, 2, 3])]


def test_labels_and_slugs_name_the_settings():
    assert [s.label for s in SETTINGS] == ["none", "pomt r=5 @1", "tome r=2", "topk r=[1,2,3]"]
    assert [s.slug for s in SETTINGS] == ["none", "pomt-r5-l1", "tome-r2", "topk-r1x2x3"]


def test_check_settings_gives_tokens_out_and_rejects_what_the_model_cannot_take():
    model = tiny_vit()
    assert check_settings(model, SETTINGS) == [17, 12, 11, 11]
    with pytest.raises(PomtError, match="pomt r=20 @1: r=20 is too large"):
        check_settings(model, [MethodSetting(method="pomt", r=20, layer=1)])
    assert not hasattr(model, "pomt_config")  # left unpatched


def test_fitted_settings_show_tomes_per_block_cap():
    model = tiny_vit()  # 17 tokens (1 prefix), 3 blocks
    fitted = fit_settings(model, [MethodSetting(method="tome", r=8), *SETTINGS])
    assert fitted[0].per_block == [8, 4, 2] and fitted[0].capped_from == 1
    assert fitted[0].label == "tome r=8 (capped from block 1)" and fitted[0].slug == "tome-r8"
    assert [s.label for s in fitted[1:]] == [s.label for s in SETTINGS]
    assert [s.per_block for s in fitted[1:]] == [[0, 0, 0], [0, 5, 0], [2, 2, 2], [1, 2, 3]]
    assert not hasattr(model, "pomt_config")


def test_bench_tome_r16_on_deit_small_runs_with_the_cap(tmp_path, capsys):
    out = tmp_path / "runs"
    code, stdout, err = run_in_process(
        ["bench", "--model", "deit_small_patch16_224", "--method", "tome", "--tome-r", "16", "--budget", "0.02",
         "--rounds", "1", "--no-lock-clocks", "--output-dir", str(out)], capsys)
    assert code == 0, err
    stem = "bench_deit-small-patch16-224_cpu_bs1_float32_none_tome-r16"
    frame = pl.read_csv(out / f"{stem}.csv")
    # 197 - 16 * 11 = 21 tokens enter block 11, which merges (21 - 1) // 2 = 10, as ToMe does
    assert frame["setting"].to_list() == ["none", "tome r=16 (capped from block 11)"]
    assert frame["tokens_out"].to_list() == [197, 11]
    _, meta = read_bench(out / f"{stem}.parquet")
    assert meta.settings["1"][1].per_block == [16] * 11 + [10]


def test_time_methods_pools_rounds_and_reports_tokens_per_batch_size():
    model = tiny_vit()
    seen = []
    plan = {1: SETTINGS, 3: SETTINGS[:2]}
    timed = time_methods(model, plan, FAST, device=torch.device("cpu"), on_progress=seen.append)
    assert set(timed) == {(1, s.label) for s in SETTINGS} | {(3, "none"), (3, "pomt r=5 @1")}
    assert [e.done for e in seen] == list(range(1, 13)) and {e.total for e in seen} == {12}
    for (b, label), (m, leaving) in timed.items():
        assert m.status in ("ok", "budget") and m.samples >= FAST.rounds and m.median_ms > 0
        assert (m.task.label, m.task.batch_size, m.task.dtype) == (label, b, "float32")
        assert m.task.model == geometry(model).name
    assert [timed[(1, s.label)][1] for s in SETTINGS] == [17, 12, 11, 11]
    frame = bench_frame(plan, timed, None)
    assert frame["setting"].to_list() == [s.label for s in SETTINGS] + ["none", "pomt r=5 @1"]
    none = frame.filter(pl.col("setting") == "none")
    pomt = frame.filter((pl.col("setting") != "none") & (pl.col("batch_size") == 3))
    expected = 100 * (pomt["latency_ms"].item() / none["latency_ms"][1] - 1)
    assert pomt["latency_change_pct"].item() == pytest.approx(expected)
    assert none["latency_change_pct"].to_list() == [0.0, 0.0] and frame["accuracy"].null_count() == 6
    assert not hasattr(model, "pomt_config")


def test_each_round_visits_the_settings_in_a_fresh_seeded_order():
    timing = BenchTiming(budget_s=0.01, min_samples=1, warmup=1, rounds=3, seed=7)
    seen = []
    time_methods(tiny_vit(), {1: SETTINGS}, timing, device=torch.device("cpu"), on_progress=seen.append)
    # A written-out reference: round k visits the settings in the k-th shuffle of one Random(seed).
    rng, expected = random.Random(7), []
    for _ in range(3):
        order = [s.label for s in SETTINGS]
        rng.shuffle(order)
        expected.append(order)
    assert [[e.method for e in seen if e.round == k] for k in range(3)] == expected
    assert len({tuple(order) for order in expected}) > 1  # the rounds do not all repeat one order


def test_accuracy_of_methods_equals_evaluating_each_patched_model(tmp_path):
    model = tiny_vit(num_classes=3)
    root = image_folder(tmp_path / "val", {"a": 4, "b": 3, "c": 3}, size=(40, 40))
    data = load_images(list_images(root), Preprocess.from_model(model))
    got = accuracy_of_methods(model, SETTINGS, data, batch_size=4, device=torch.device("cpu"), dtype=torch.float32)
    for s in SETTINGS:
        counts = evaluate(apply(model, s.method, r=s.r, layer=s.layer), data, batch_size=10)
        remove(model)
        assert got[s.label] == (counts.top1_percent, counts.top5_percent, 10)


def test_the_report_names_the_checkpoint_and_the_weights_hash(tmp_path, capsys):
    model = create_model("digits-vit")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.bias"] = state["head.bias"] + 1.0
    save_file(state, str(tmp_path / "tuned.safetensors"))
    hashes = {}
    for name, extra in (("bundled", []), ("tuned", ["--checkpoint", str(tmp_path / "tuned.safetensors")])):
        out = tmp_path / name
        code, _, err = run_in_process(["bench", "--model", "digits-vit", "--budget", "0.02", "--rounds", "1",
                                       "--no-lock-clocks", "--output-dir", str(out), *extra], capsys)
        assert code == 0, err
        (parquet,) = out.glob("bench_*.parquet")
        _, meta = read_bench(parquet)
        hashes[name] = meta.weights_sha256
        if name == "tuned":
            assert meta.weights == "checkpoint" and meta.weights_file == str((tmp_path / "tuned.safetensors").resolve())
        else:
            assert meta.weights == "bundled" and meta.weights_file is None
    assert hashes["bundled"] == state_dict_sha256(model)
    assert hashes["tuned"] == state_dict_sha256(create_model("digits-vit", checkpoint=tmp_path / "tuned.safetensors"))
    assert hashes["tuned"] != hashes["bundled"]


def test_bench_command_with_accuracy_on_digits(tmp_path, pomt):
    out = tmp_path / "runs"
    done = pomt("bench", "--model", "digits-vit", "--data", "digits", "--limit", "100", "--method", "pomt",
                "--method", "tome", "-r", "24", "--tome-r", "6", "--batch-size", "2", "--budget", "0.05",
                "--rounds", "1", "--no-lock-clocks", "--output-dir", str(out))
    assert done.returncode == 0, done.stderr
    stem = "bench_digits-vit_cpu_bs2_float32_none_pomt-r24-l3_tome-r6"
    assert sorted(p.name for p in out.iterdir()) == [f"{stem}.csv", f"{stem}.parquet"]
    stored, meta = read_bench(out / f"{stem}.parquet")
    # A CSV has no types: its all-null columns (no predictions here) would read back as text.
    frame = pl.read_csv(out / f"{stem}.csv", schema_overrides=stored.schema)
    assert frame.equals(stored, null_equal=True)
    assert frame["setting"].to_list() == ["none", "pomt r=24 @3", "tome r=6"]
    assert frame["tokens_out"].to_list() == [65, 41, 41] and frame["images"].to_list() == [100] * 3
    assert frame["accuracy"][0] >= 90 and frame["accuracy_change"][0] == 0
    assert meta.model == "digits-vit" and meta.weights == "bundled" and meta.clocks.mode == "unlocked"
    # The paths print whole, each on one line; the rest reads whole at 80 columns (a
    # subprocess's console is 80 wide): no number cut short.
    lines = done.stdout.splitlines()
    assert f"report: {out / stem}.csv" in lines and f"        {out / stem}.parquet" in lines
    assert "\u2026" not in done.stdout and all(len(line) <= 80 for line in lines if str(out) not in line)
    for row in frame.iter_rows(named=True):
        assert f"{row['latency_ms']:.3f}" in done.stdout and f"{row['accuracy']:.2f}" in done.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "best"], "Invalid value for '--method'"),
        (["--method", "pomt"], "needs -r R or --r-from"),
        (["--method", "pomt", "-r", "70"], "r=70 is too large"),
        (["-r", "5", "--r-from", "x.json"], "not both"),
        (["--r-from", "missing.json"], "missing.json"),
        (["--method", "tome", "--tome-r", "-1"], "tome r=-1: r=-1 at block 0 is negative"),
        (["-r", "5", "--cuda-graphs"], "--cuda-graphs needs a CUDA device"),
        (["--batch-size", "0"], "below 1"),
        # Options that would be ignored.
        (["--method", "tome", "--tome-r", "2", "-r", "10"], "-r sets POMT's R, but --method names only tome"),
        (["--method", "none", "--r-from", "x.json"], "--r-from sets POMT's R, but --method names only none"),
        (["--method", "tome", "--layer", "1"], "--layer applies to POMT only"),
        (["--layer", "1"], "--layer applies to POMT only"),
        (["--method", "tome", "--topk-r", "2"], "--topk-r sets topk's r, but --method names only tome"),
        (["--method", "pomt", "-r", "5", "--tome-r", "2"], "--tome-r sets tome's r, but --method names only pomt"),
        (["-r", "5", "--limit", "5"], "--limit applies to the accuracy measured on --data"),
        (["-r", "5", "--class-order", "name"], "--class-order applies to the accuracy measured on --data"),
    ],
)
def test_bad_input_is_a_one_line_error_and_writes_nothing(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs"
    code, _, err = run_in_process(["bench", "--model", "digits-vit", "--no-lock-clocks", "--output-dir", str(out),
                                   *args], capsys)
    assert code == 2, err
    assert err.startswith("error:") and message in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_bad_input_in_a_subprocess_is_one_line_too(tmp_path, pomt):
    # The cases above run in this process; one runs as the user runs it.
    out = tmp_path / "runs"
    done = pomt("bench", "--model", "digits-vit", "--no-lock-clocks", "--output-dir", str(out), "--method", "pomt",
                "-r", "70", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error:") and "r=70 is too large" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()


def test_random_weights_with_data_are_refused(tmp_path, capsys):
    code, _, err = run_in_process(["bench", "--model", "deit_tiny_patch16_224", "-r", "5", "--data", "digits",
                                   "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "random weights" in err and not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "runs"
    done = run_pomt("demo", "--output-dir", str(out), "--budget", "0.05")
    assert done.returncode == 0, done.stderr
    return out


def test_demo_runs_the_pipeline_into_one_folder(demo_dir):
    out = demo_dir
    names = sorted(p.name for p in out.iterdir())
    for prefix, suffixes in {"latency_digits-vit_cpu_bs1-32_float32_pomt-layers0-1-2-3": ("parquet", "png"),
                             "accuracy_digits-vit_float32_pomt-layers0-1-2-3_digits": ("parquet", "png"),
                             "compute_r_digits-vit_cpu_bs1-32_float32_pomt-layers0-1-2-3": ("json", "png")}.items():
        for suffix in suffixes:
            assert f"{prefix}.{suffix}" in names
    report = json.loads((out / "compute_r_digits-vit_cpu_bs1-32_float32_pomt-layers0-1-2-3.json").read_text())
    # With R = 0 at every batch size (refine on a busy machine) bench timed the unpruned model
    # alone (ToMe and Top-K had nothing to match); else also POMT, ToMe and Top-K.
    alone = all(c["R"] == 0 for c in report["choices"])
    stem = "bench_digits-vit_cpu_bs1-32_float32_none" + ("." if alone else "_")
    bench = [n for n in names if n.startswith(stem) and n.endswith(".csv")]
    assert len(bench) == 1, names
    # The CSV read with the parquet's types: where every choice is R = 0 (refine on a busy
    # machine), the prediction columns are all empty and would otherwise read as text.
    types = pl.read_parquet_schema(out / bench[0].replace(".csv", ".parquet"))
    frame = pl.read_csv(out / bench[0], schema_overrides=types)
    pomt_rows = frame.filter(pl.col("method") == "pomt")
    pruned = [c for c in report["choices"] if c["R"] > 0]  # R = 0 is the unpruned model, benched as none
    assert set(frame["method"]) == ({"none"} if alone else {"none", "pomt", "tome", "topk"})
    assert ("so ToMe and Top-K" in (out / "summary.md").read_text()) == alone
    assert pomt_rows["tokens_out"].to_list() == [65 - c["R"] for c in pruned]
    assert report["workload"] == "pomt" and report["layers"] == [0, 1, 2, 3]
    # bench ran the report's (layer, R) and predicted it as its own unpruned ms times the profile's ratio.
    assert pomt_rows["setting"].to_list() == [f"pomt r={c['R']} @{c['layer']}" for c in pruned]
    assert pomt_rows["profile_ms"].to_list() == [c["latency_ms"] for c in pruned]
    assert pomt_rows["predicted_ratio"].to_list() == [c["latency_ratio"] for c in pruned]
    assert pomt_rows["predicted_by"].to_list() == ["pomt"] * len(pruned)
    none_rows = frame.filter(pl.col("method") == "none")
    none_ms = dict(zip(none_rows["batch_size"].to_list(), none_rows["latency_ms"].to_list()))
    assert pomt_rows["predicted_ms"].to_list() == pytest.approx(
        [none_ms[c["batch_size"]] * c["latency_ratio"] for c in pruned])
    # The unpruned row is the reference: the profile's ms, no prediction of its own.
    assert none_rows["profile_ms"].to_list() == [c["reference_ms"] for c in report["choices"]]
    assert none_rows["predicted_ms"].null_count() == none_rows["prediction_error"].null_count() == none_rows.height
    predicted = frame.filter(pl.col("predicted_ms").is_not_null())
    errors = (predicted["latency_ms"] / predicted["predicted_ms"] - 1).to_list()
    assert predicted["prediction_error"].to_list() == pytest.approx(errors)
    summary = (out / "summary.md").read_text()
    for choice in report["choices"]:
        setting = f"R = {choice['R']} at layer {choice['layer']}" if choice["R"] else "R = 0"  # no layer unpruned
        assert f"**{setting}**" in summary
    # refine ran between compute-r and bench: every choice was made again from side-by-side ratios.
    assert report["format_version"] == 4 and report["refine"]["rounds"] == 6 and report["refine"]["candidates"] == 3
    assert all(c["refined"] for c in report["choices"])
    assert "Refined (`pomt refine`" in summary
    for choice in report["choices"]:
        assert f"- batch {choice['batch_size']}: R = {choice['R']}" in summary
        if choice["R"]:
            assert f"refined ratio {choice['latency_ratio']:.3f}" in summary
    for image in ("latency_digits-vit_cpu_bs1-32_float32_pomt-layers0-1-2-3.png",
                  "compute_r_digits-vit_cpu_bs1-32_float32_pomt-layers0-1-2-3.png"):
        assert f"]({image})" in summary
    assert set(frame["setting"].to_list()) <= {line.split(" | ")[1] for line in summary.splitlines()
                                               if line.startswith("| 1 |") or line.startswith("| 32 |")}
    # Per batch size: never slower, or R = 0 with nothing predicted beyond the unpruned model.
    for choice in report["choices"]:
        if choice["R"] == 0:
            assert f"- batch {choice['batch_size']}: R = 0, nothing is predicted beyond" in summary
        else:
            assert f"- batch {choice['batch_size']}: pomt r={choice['R']} @{choice['layer']}: saving predicted " in summary


def constant(ms: float) -> Measurement:
    """A measurement of 20 calls of ``ms`` each: median and interval are ``ms``."""
    return Measurement(status="ok", mode="eager", raw_ms=(ms,) * 20, rel_precision=0.01)


POMT5 = MethodSetting(method="pomt", r=5, layer=1)


def choice(R: int, **fields) -> Choice:
    """A compute-r choice at batch 32 (N = 17) whose profile read 12.8 ms unpruned."""
    return Choice(batch_size=32, R=R, tokens=17 - R, layer=1, workload="pomt", reference_tokens=17,
                  reference_ms=12.8, latency_ms=12.8 if R == 0 else 9.6, latency_saved_pct=0.0 if R == 0 else 25.0,
                  accuracy=90.0, accuracy_lost=0.0, utility=0.5, pays=R > 0, **fields)


def test_the_prediction_is_benchs_unpruned_ms_times_the_profiles_ratio():
    # The profile read both models 28% slower than bench (12.8 and 9.6 ms against 10 and 7.5):
    # the ratio 9.6 / 12.8 = 0.75 cancels that offset.
    predictions = {(32, "none"): Prediction(profile_ms=12.8, workload="pomt"),
                   (32, POMT5.label): Prediction(profile_ms=9.6, ratio=0.75, low=0.7, high=0.8, workload="pomt")}
    timed = {(32, "none"): (constant(10.0), 17), (32, POMT5.label): (constant(8.0), 12)}
    frame = bench_frame({32: [MethodSetting(method="none"), POMT5]}, timed, None, predictions)
    unpruned, pruned = frame.rows(named=True)
    assert (pruned["profile_ms"], pruned["predicted_ms"], pruned["predicted_by"]) == (9.6, 7.5, "pomt")
    assert pruned["prediction_error"] == pytest.approx(8.0 / 7.5 - 1)  # +6.67%; the profile's ms: -16.7%
    assert (pruned["predicted_ratio"], pruned["predicted_ratio_low"], pruned["predicted_ratio_high"]) == (
        0.75, 0.7, 0.8)
    assert pruned["slower_than_none"] is False
    # The unpruned row shows the profile's ms and has no error of its own: its measurement is the reference.
    assert unpruned["profile_ms"] == 12.8
    assert (unpruned["predicted_ms"], unpruned["prediction_error"], unpruned["slower_than_none"]) == (None, None, None)
    check, = check_choices(frame, [choice(5, latency_ratio=0.75, latency_ratio_low=0.7, latency_ratio_high=0.8)])
    assert (check.predicted_saving_pct, check.predicted_ms, check.measured_ms) == (25.0, 7.5, 8.0)
    assert check.measured_saving_pct == pytest.approx(20.0)
    assert check.saving_low_pct == pytest.approx(20.0) and check.saving_high_pct == pytest.approx(30.0)
    # Constant samples: the measured change's interval is the point itself.
    assert check_text(check) == ("batch 32: pomt r=5 @1: saving predicted 25.0% (20.0% to 30.0%), measured 20.0% "
                                 "(20.0% to 20.0%); not slower than none beyond the interval")


def test_a_setting_slower_beyond_both_intervals_is_said_and_r0_predicts_nothing():
    predictions = {(32, POMT5.label): Prediction(profile_ms=9.6, ratio=0.75, workload="pomt")}
    timed = {(32, "none"): (constant(10.0), 17), (32, POMT5.label): (constant(11.0), 12)}
    frame = bench_frame({32: [MethodSetting(method="none"), POMT5]}, timed, None, predictions)
    assert frame["slower_than_none"].to_list() == [None, True]
    assert frame["prediction_error"][1] == pytest.approx(11.0 / 7.5 - 1)
    check, = check_choices(frame, [choice(5)])
    assert check.slower is True and check_text(check).endswith("; SLOWER than none beyond the interval")
    # R = 0: bench measured the unpruned model as none; nothing is predicted beyond it.
    only = bench_frame({32: [MethodSetting(method="none")]}, {(32, "none"): (constant(10.0), 17)}, None,
                       {(32, "none"): Prediction(profile_ms=12.8, workload="pomt")})
    check, = check_choices(only, [choice(0)])
    assert (check.predicted_ms, check.prediction_error, check.profile_ms, check.slower) == (None, None, 12.8, False)
    assert check_text(check) == ("batch 32: R = 0, nothing is predicted beyond the unpruned model "
                                 "(never slower: it is the unpruned model)")


def test_slower_than_none_needs_the_intervals_apart_not_only_the_medians():
    def samples(first: float) -> Measurement:
        return Measurement(status="ok", mode="eager", raw_ms=[first + i for i in range(20)], rel_precision=0.01)

    # 20 samples: the 95% interval of the median is the 6th to the 15th smallest (0-based ranks 5 and 14).
    none, overlapping, apart = samples(9.0), samples(10.0), samples(30.0)
    assert (none.median_ms, none.ci_low_ms, none.ci_high_ms) == (18.5, 14.0, 23.0)
    assert (overlapping.median_ms, overlapping.ci_low_ms) == (19.5, 15.0)
    # A median 1 ms above none's, but 15 ms is inside none's interval: not slower beyond the interval of the ratio.
    assert slower_than_none(overlapping, none) is False
    assert slower_than_none(apart, none) is True  # 35 ms > 23 ms
    assert slower_than_none(none, none) is None


def test_r_from_a_report_of_another_model_or_batch_size_is_refused(tmp_path, capsys, demo_dir):
    path = demo_dir / "compute_r_digits-vit_cpu_bs1-32_float32_pomt-layers0-1-2-3.json"
    out = ["--output-dir", str(tmp_path / "o")]
    code, _, err = run_in_process(["bench", "--model", "deit_tiny_patch16_224", "--r-from", str(path), *out], capsys)
    assert code == 2 and "computed for digits-vit, not deit_tiny_patch16_224" in err
    code, _, err = run_in_process(["bench", "--model", "digits-vit", "--r-from", str(path), "--batch-size", "4", *out],
                                  capsys)
    assert code == 2 and "gives R for batch size(s) 1, 32, not for 4" in err
    data = json.loads(path.read_text())
    data["choices"][0]["layer"] = 9
    (tmp_path / "deeper.json").write_text(json.dumps(data))
    code, _, err = run_in_process(["bench", "--model", "digits-vit", "--r-from", str(tmp_path / "deeper.json"), *out],
                                  capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "chose layer 9 at batch 1, but digits-vit has 4 blocks (layer 0..3)" in err
    other_layer = 0 if data["choices"][1]["layer"] != 0 else 1
    code, _, err = run_in_process(["bench", "--model", "digits-vit", "--r-from", str(path), "--layer",
                                   str(other_layer), *out], capsys)
    assert code == 2 and f"--layer {other_layer} contradicts --r-from" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("field, value, message", [
    ("num_tokens", 257, "chose R for digits-vit with 257 tokens (1 prefix), but the model benched here has 65 "
                        "(1 prefix): give the --img-size its profiles were measured at"),
    ("dtype", "float16", "chose R from a latency profile in float16, but this bench runs --dtype float32: bench "
                         "with --dtype float16"),
])
def test_r_from_a_report_of_another_geometry_or_dtype_is_refused(tmp_path, capsys, demo_dir, field, value, message):
    """R counts the profiled model's tokens, and its predicted ratio belongs to the profile's dtype:
    a report of another input size (another N) or dtype would bench and predict the wrong setting."""
    data = json.loads((demo_dir / "compute_r_digits-vit_cpu_bs1-32_float32_pomt-layers0-1-2-3.json").read_text())
    if field == "dtype":
        data["latency"]["dtype"] = value
    else:  # the same R of a larger model: its choices keep R + n = N
        more = value - data[field]
        data.update({field: value, "tokens": data["tokens"] + more})
        for choice in data["choices"]:
            choice.update(tokens=choice["tokens"] + more, reference_tokens=choice["reference_tokens"] + more)
    path = tmp_path / "other.json"
    path.write_text(json.dumps(data))
    code, _, err = run_in_process(["bench", "--model", "digits-vit", "--r-from", str(path), "--output-dir",
                                   str(tmp_path / "o")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o").exists()


def test_default_methods_are_those_with_a_setting(tmp_path, capsys):
    out = tmp_path / "runs"
    args = ["bench", "--model", "digits-vit", "--budget", "0.02", "--rounds", "1", "--no-lock-clocks",
            "--output-dir", str(out)]
    code, _, err = run_in_process(args, capsys)
    assert code == 0, err
    assert pl.read_csv(out / "bench_digits-vit_cpu_bs1_float32_none_tome-r8_topk-r8.csv")["method"].to_list() == \
        ["none", "tome", "topk"]
    code, _, err = run_in_process([*args, "-r", "10"], capsys)
    assert code == 0, err
    frame = pl.read_csv(out / "bench_digits-vit_cpu_bs1_float32_none_pomt-r10-l3_tome-r8_topk-r8.csv")
    assert frame["method"].to_list() == ["none", "pomt", "tome", "topk"] and frame["tokens_out"][1] == 55

