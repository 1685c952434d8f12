"""``pomt demo``: the whole pipeline on the bundled digits model and data, into one folder with a summary page."""

from __future__ import annotations

import datetime as _dt
import math
import time
from pathlib import Path

import polars as pl
import typer
from pomt_cli.console import plain_console
from rich.rule import Rule

from pomt_cli import __version__, digits
from pomt_cli.devices.presets import default_preset_name, load_preset
from pomt_cli.errors import PomtError
from pomt_cli.formats.latency import read_latency as read_latency_profile
from pomt_cli.measure.steps import find_curve_steps
from pomt_cli.formats.outputs import atomic_write_text, check_output_dir
from pomt_cli.formats.lookup import read_profile
from pomt_cli.formats.report import read_report

out = plain_console()

#: Batch sizes profiled and benched: one image, and a batch that fills a CPU's cores.
BATCH_SIZES = "1,32"
#: POMT's pruning blocks profiled: every block of digits-vit; compute-r chooses among them.
LAYERS = ",".join(str(i) for i in range(digits.ARCHITECTURE["depth"]))
#: The kept-token grid of both profiles: N = 65 down to 5 in steps of 4 (16 points per curve).
TOKENS = "65:5:4"


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def _markdown_table(frame: pl.DataFrame, formats: dict[str, str]) -> str:
    """``frame``'s columns named in ``formats`` (header -> format spec) as a Markdown table."""
    headers = list(formats)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---:" for _ in headers) + " |"]
    for row in frame.iter_rows(named=True):
        cells = []
        for header, spec in formats.items():
            column, fmt = spec.split(":", 1) if ":" in spec else (spec, "")
            value = row[column]
            cells.append("" if value is None else format(value, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def summary_page(paths: dict[str, Path], folder: Path, device: str, elapsed_s: float) -> str:
    """The demo's Markdown summary: what ran, R, the steps, the comparison, with the plots."""
    latency, latency_meta = read_latency_profile(paths["latency"])
    accuracy, accuracy_meta = read_profile(paths["accuracy"], "accuracy")
    report = read_report(paths["report"])
    bench = pl.read_parquet(paths["bench"])
    steps = find_curve_steps(latency, top=3)
    rel = {name: p.relative_to(folder).as_posix() for name, p in paths.items()}
    full = accuracy.row(0, named=True)
    lines = [
        "# pomt demo: digits-vit",
        "",
        f"Run on {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC with pomt {__version__}, device preset "
        f"`{device}` ({latency_meta.device_name}), {elapsed_s:.0f} s in all. The model is the bundled "
        f"`digits-vit` ({latency_meta.num_tokens} tokens: {latency_meta.num_tokens - latency_meta.num_prefix} patches "
        f"and a class token, {latency_meta.num_blocks} blocks), evaluated on the {accuracy_meta['num_images']} held-out "
        "images of scikit-learn's handwritten digits.",
        "",
        "## R",
        "",
    ]
    lines += [f"compute-r chose the block and R together (criterion: {report.criterion}, alpha {report.alpha}) "
              f"from the latency of the POMT-patched model itself and POMT's accuracy at each layer; bench then "
              "measured the choice beside the unpruned model. Error = measured / predicted − 1.", "",
              "| batch | choice | tokens kept | predicted ms | measured ms | error | saving predicted | "
              "saving measured | accuracy lost (pts) |",
              "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in report.choices:
        # R = 0 is the unpruned model: bench measured it as `none`.
        row = bench.filter((pl.col("batch_size") == c.batch_size)
                           & (pl.col("method") == ("pomt" if c.R else "none"))).row(0, named=True)
        choice = f"**R = {c.R} at layer {c.layer}**" if c.layer is not None else f"**R = {c.R}**"
        if not c.pays:
            choice += " (pruning does not pay here)"
        measured_saving = "" if row["latency_change_pct"] is None else f"{-row['latency_change_pct']:.1f}%"
        lines.append(
            f"| {c.batch_size} | {choice} | {c.tokens} of {report.num_tokens} | {c.latency_ms:.3f} | "
            f"{_cell(row['latency_ms'], '.3f')} | {_cell(row['prediction_error'], '+.1%')} | "
            f"{c.latency_saved_pct:.1f}% | {measured_saving} | {c.accuracy_lost:.2f} |")
    lines += ["", f"![latency, accuracy and utility]({rel['report_plot']})", "",
              "## Latency against kept tokens", "",
              f"Measured with `pomt profile` ({latency_meta.timing_mode}, clocks {latency_meta.clocks.mode}). "
              f"File: `{rel['latency']}`.", "", f"![latency]({rel['latency_plot']})", ""]
    if steps.is_empty():
        lines.append("No step stands out from the curve's trend on this device.")
    else:
        lines += ["Largest steps:", "", _markdown_table(steps, {
            "layer": "layer", "batch": "batch_size", "from n": "from_tokens", "to n": "to_tokens",
            "from ms": "from_ms:.3f", "to ms": "to_ms:.3f", "drop %": "drop_pct:.1f"})]
    picks = accuracy.filter(pl.col("tokens").is_in([n for n in accuracy["tokens"].to_list() if n % 8 == 1 or n == 2]))
    if picks["layer"].is_not_null().any():
        wide = picks.with_columns(pl.format("top-1 % at layer {}", pl.col("layer")).alias("curve")).pivot(
            "curve", index="tokens", values="accuracy", maintain_order=True)
        accuracy_table = _markdown_table(wide, {"kept tokens n": "tokens",
                                                **{c: f"{c}:.2f" for c in wide.columns if c != "tokens"}})
    else:
        accuracy_table = _markdown_table(picks, {"kept tokens n": "tokens", "top-1 %": "accuracy:.2f",
                                                 "top-5 %": "top5:.2f"})
    lines += ["", "## Accuracy against kept tokens", "",
              f"Estimated with `pomt estimate-accuracy` (the {accuracy_meta['estimator']} estimator"
              + (f" at layers {', '.join(map(str, accuracy_meta['layers']))}" if accuracy_meta.get("layers") else "")
              + f"): {full['accuracy']:.2f}% top-1 with all tokens. File: `{rel['accuracy']}`.", "",
              f"![accuracy]({rel['accuracy_plot']})", "",
              accuracy_table,
              "", "## The methods compared", "",
              f"Measured side by side with `pomt bench` (interleaved rounds). File: `{rel['bench']}`.", "",
              _markdown_table(bench, {
                  "batch": "batch_size", "method": "setting", "tokens out": "tokens_out",
                  "median ms": "latency_ms:.3f", "p10 ms": "p10_ms:.3f", "p90 ms": "p90_ms:.3f",
                  "vs none %": "latency_change_pct:+.1f", "predicted ms": "predicted_ms:.3f",
                  "error": "prediction_error:+.1%", "top-1 %": "accuracy:.2f",
                  "change (pts)": "accuracy_change:+.2f"}),
              ""]
    slower = bench.filter((pl.col("method") == "pomt") & (pl.col("latency_change_pct") > 0))["batch_size"].to_list()
    if slower:
        lines += [f"POMT with the chosen R measured slower than the unpruned model at batch "
                  f"{', '.join(map(str, slower))}: within the two measurements' noise when R = 0 or the predicted "
                  "saving was small.", ""]
    lines += ["Timings on a shared or throttled machine vary from run to run; the files hold each point's "
              "spread and sample count.", ""]
    return "\n".join(lines)


def demo(
    output_dir: Path = typer.Option(Path("runs/demo"), "--output-dir", help="Folder for every file and the summary."),
    device: str | None = typer.Option(
        None, "--device", help="Device preset to measure on (default: nvidia with CUDA, else cpu; or orin...)."
    ),
    torch_device: str | None = typer.Option(None, "--torch-device", help="Override the preset's torch device."),
    lock_clocks: bool = typer.Option(
        False, "--lock-clocks/--no-lock-clocks", help="Lock the device's clocks while timing (needs root)."
    ),
    budget: float = typer.Option(
        0.25, "--budget", help="Seconds per profile point at most (bench: four times as long per method and round)."
    ),
) -> dict[str, Path]:
    """Run profile, estimate-accuracy, compute-r and bench on the bundled digits model; write a summary page."""
    from pomt_cli.cli import app

    device = device or default_preset_name()
    load_preset(device)  # an unknown preset fails before anything runs
    folder = check_output_dir(output_dir)  # each step creates it when it writes its files
    began = time.perf_counter()
    common = ["--device", device, *(["--torch-device", torch_device] if torch_device else []),
              "--lock-clocks" if lock_clocks else "--no-lock-clocks"]

    def step(title: str, args: list[str]) -> dict[str, Path]:
        out.print(Rule(f"pomt {args[0]}: {title}"))
        out.print("$ pomt " + " ".join(args), style="dim")
        result = app(args=args, standalone_mode=False, prog_name="pomt")
        if not isinstance(result, dict):  # an exit code: the step stopped (Ctrl-C)
            raise typer.Exit(result or 1)
        return result

    latency = step("latency of the POMT-patched model against kept tokens, at every layer", [
        "profile", "--model", digits.NAME, "--method", "pomt", "--layer", LAYERS, "--batch-size", BATCH_SIZES,
        "--tokens", TOKENS, "--budget", str(budget), "--output-dir", str(folder), *common])
    accuracy = step("POMT's accuracy against kept tokens, at every layer", [
        "estimate-accuracy", "--model", digits.NAME, "--data", "digits", "--estimator", "pomt", "--layer", LAYERS,
        "--tokens", TOKENS, "--batch-size", "150", "--output-dir", str(folder)])
    chosen = step("R from the two profiles", [
        "compute-r", "--latency", str(latency["profile"]), "--accuracy", str(accuracy["profile"]),
        "--output-dir", str(folder)])
    report = read_report(chosen["report"])
    # ToMe and Top-K remove about as many tokens over all blocks as POMT does at once.
    per_block = max(1, math.ceil(max(c.R for c in report.choices) / digits.ARCHITECTURE["depth"]))
    benched = step("the chosen (layer, R) against the baseline, ToMe and Top-K", [
        "bench", "--model", digits.NAME, "--data", "digits", "--r-from", str(chosen["report"]),
        "--tome-r", str(per_block), "--topk-r", str(per_block), "--budget", f"{4 * budget:g}", "--rounds", "3",
        "--output-dir", str(folder), *common])
    paths = {
        "latency": latency["profile"], "latency_plot": latency["plot"],
        "accuracy": accuracy["profile"], "accuracy_plot": accuracy["plot"],
        "report": chosen["report"], "report_plot": chosen["plot"], "bench": benched["parquet"],
    }
    missing = [str(p) for p in paths.values() if not Path(p).is_file()]
    if missing:
        raise PomtError(f"the demo's steps did not write {', '.join(missing)}")
    summary = atomic_write_text(folder / "summary.md", summary_page(paths, folder, device, time.perf_counter() - began))
    out.print(Rule("done"))
    out.print(f"summary: {summary} ({time.perf_counter() - began:.0f} s)")
    return {**paths, "summary": summary}
