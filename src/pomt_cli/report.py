"""The demo's Markdown summary page: what ran, the chosen R, the steps and the methods compared."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import polars as pl

from pomt_cli import __version__
from pomt_cli.bench import check_choices, check_text
from pomt_cli.formats.accuracy import read_accuracy
from pomt_cli.formats.bench import read_bench
from pomt_cli.formats.latency import read_latency
from pomt_cli.formats.report import Choice, Report, read_report
from pomt_cli.measure.steps import find_curve_steps


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


def _refined_text(choice: Choice, report: Report, before: Choice | None) -> str:
    """Whether ``choice`` was refined; its profile and refined ratio; compute-r's choice before it."""
    if not choice.refined or report.refine is None:
        return f"{choice.setting_text}, not refined (chosen from the profile alone)"
    row = next((r for r in report.refine.settings if r.batch_size == choice.batch_size and r.chosen), None)
    text = f"{choice.setting_text}, refined"
    if row is not None and choice.R:
        text += f": profile ratio {_cell(row.profile_ratio, '.3f') or '?'}, refined ratio {row.ratio:.3f}"
        if row.ratio_low is not None and row.ratio_high is not None:
            text += f" ({row.ratio_low:.3f} to {row.ratio_high:.3f})"
    elif not choice.pays:
        text += ": no candidate measured faster than the unpruned model beyond its interval"
    if before is not None:
        text += f"; compute-r chose {before.setting_text} ({'unchanged' if choice.same_setting(before) else 'changed'})"
    return text


#: The summary's first line starts so: how a demo knows its own page from a user's file.
SUMMARY_TITLE = "# pomt demo:"


def summary_page(paths: dict[str, Path], folder: Path, device: str, elapsed_s: float,
                 compared_note: str | None = None) -> str:
    """The demo's Markdown summary: what ran, R, the steps, the comparison, with the plots.

    ``paths`` names the demo's files: ``latency``, ``latency_plot``, ``accuracy``,
    ``accuracy_plot``, ``report``, ``report_plot`` and ``bench`` (its Parquet file); the
    page links them relative to ``folder``. ``compared_note`` opens the comparison's
    section (why a method was left out).
    """
    latency, latency_meta = read_latency(paths["latency"])
    accuracy, accuracy_meta = read_accuracy(paths["accuracy"])
    report = read_report(paths["report"])
    bench, _ = read_bench(paths["bench"])
    steps = find_curve_steps(latency, top=3)
    rel = {name: p.relative_to(folder).as_posix() for name, p in paths.items()}
    full = accuracy.row(0, named=True)
    lines = [
        f"{SUMMARY_TITLE} digits-vit",
        "",
        f"Run on {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC with pomt {__version__}, device preset "
        f"`{device}` ({latency_meta.device_name}), {elapsed_s:.0f} s in all. The model is the bundled "
        f"`digits-vit` ({latency_meta.num_tokens} tokens: {latency_meta.num_tokens - latency_meta.num_prefix} patches "
        f"and a class token, {latency_meta.num_blocks} blocks), evaluated on the {accuracy_meta.num_images} held-out "
        "images of scikit-learn's handwritten digits.",
        "",
        "## R",
        "",
    ]
    lines += [f"compute-r chose the block and R together (criterion: {report.criterion}, alpha {report.alpha}) "
              f"from the latency of the POMT-patched model itself and POMT's accuracy at each layer; refine "
              "measured its best candidates again beside the unpruned model and chose again; bench then "
              "measured the choice beside the unpruned model. The predicted saving is the chosen setting's "
              "latency over the unpruned model's: measured side by side by refine when the choice was refined, "
              "else the profile's on the same curve (in brackets: its interval; measured side by side, the "
              "intervals include the drift between rounds); the "
              "predicted ms is bench's own unpruned ms times that ratio, so that an offset "
              "common to the whole profile cancels. Error = measured / predicted − 1. With R = 0 nothing is "
              "predicted beyond the unpruned model.", "",
              "| batch | choice | tokens kept | saving predicted | saving measured | predicted ms | "
              "measured ms | error | profile ms | accuracy lost (pts) |",
              "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    choices = {c.batch_size: c for c in report.choices}
    checks = check_choices(bench, report.choices)
    for check in checks:
        c = choices[check.batch_size]
        choice = f"**{c.setting_text}**"
        if not c.pays:
            choice += " (pruning does not pay here)"
        predicted = _cell(check.predicted_saving_pct, ".1f") + ("%" if check.predicted_saving_pct is not None else "")
        if check.saving_low_pct is not None and check.saving_high_pct is not None:
            predicted += f" ({check.saving_low_pct:.1f} to {check.saving_high_pct:.1f}%)"
        measured = "" if check.measured_saving_pct is None else f"{check.measured_saving_pct:.1f}%"
        if measured and check.measured_low_pct is not None and check.measured_high_pct is not None:
            measured += f" ({check.measured_low_pct:.1f} to {check.measured_high_pct:.1f}%)"
        lines.append(
            f"| {c.batch_size} | {choice} | {c.tokens} of {report.num_tokens} | {predicted or 'none'} | "
            f"{measured} | {_cell(check.predicted_ms, '.3f')} | {_cell(check.measured_ms, '.3f')} | "
            f"{_cell(check.prediction_error, '+.1%')} | {_cell(check.profile_ms, '.3f')} | {c.accuracy_lost:.2f} |")
    lines += ["", "Refined (`pomt refine`: the best candidates measured again beside the unpruned model in "
              "interleaved rounds, and the choice made again from their ratios):", ""]
    before = {c.batch_size: c for c in report.refine.before} if report.refine is not None else {}
    for c in report.choices:
        lines.append(f"- batch {c.batch_size}: " + _refined_text(c, report, before.get(c.batch_size)))
    lines += ["", "Never slower (the chosen setting against the unpruned model, beyond the interval of their "
              "ratio):", "", *[f"- {check_text(check)}" for check in checks]]
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
              f"Estimated with `pomt estimate-accuracy` (the {accuracy_meta.estimator} estimator"
              + (f" at layers {', '.join(map(str, accuracy_meta.layers))}" if accuracy_meta.layers else "")
              + f"): {full['accuracy']:.2f}% top-1 with all tokens. File: `{rel['accuracy']}`.", "",
              f"![accuracy]({rel['accuracy_plot']})", "",
              accuracy_table,
              "", "## The methods compared", "",
              *([compared_note, ""] if compared_note else []),
              f"Measured side by side with `pomt bench` (interleaved rounds). File: `{rel['bench']}`.", "",
              _markdown_table(bench, {
                  "batch": "batch_size", "method": "setting", "tokens out": "tokens_out",
                  "median ms": "latency_ms:.3f", "p10 ms": "p10_ms:.3f", "p90 ms": "p90_ms:.3f",
                  "vs none %": "latency_change_pct:+.1f", "profile ms": "profile_ms:.3f",
                  "predicted ms": "predicted_ms:.3f", "error": "prediction_error:+.1%", "top-1 %": "accuracy:.2f",
                  "change (pts)": "accuracy_change:+.2f"}),
              ""]
    lines += ["Timings on a shared or throttled machine vary from run to run; the files hold each point's "
              "spread and sample count.", ""]
    return "\n".join(lines)
