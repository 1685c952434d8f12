"""What `pomt profile` says of the points that stopped on their time budget."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from pomt_cli.cli.profile import budget_note
from pomt_cli.formats.latency import read_latency

H200 = Path(__file__).resolve().parents[1] / "docs" / "gpu" / "data" / "2026-11-28-h200"


def test_the_note_names_where_the_h200_profile_ran_out_of_budget():
    # Batch 64 float32 eager on the H200: the host-bound points at small n drift and end on
    # their budget; the user is told which, and that they place no step.
    frame, meta = read_latency(H200 / "profile-bs64_float32_eager-a.parquet")
    note = budget_note(frame, meta.rel_precision, meta.budget_s)
    assert note.startswith("27 point(s) did not reach \u00b11.0% within 1 s (batch 64: n = 2-3, 5, 9-11, 13-17,")
    assert "they place no step" in note and "\n" not in note
    frame, meta = read_latency(H200 / "profile-bs1-4_float16_cudagraphs-a.parquet")
    assert budget_note(frame, meta.rel_precision, meta.budget_s) is None


def test_the_note_goes_by_batch_size_with_each_n_once():
    frame = pl.DataFrame({
        "batch_size": [4, 4, 4, 1, 1, 1, 1],
        "tokens": [9, 8, 7, 9, 8, 8, 5],
        "status": ["budget", "budget", "ok", "ok", "budget", "budget", "budget"],
    })
    note = budget_note(frame, 0.02, 0.5)
    assert note.startswith("5 point(s) did not reach \u00b12.0% within 0.5 s (batch 1: n = 5, 8; batch 4: n = 8-9);")


def test_the_note_of_a_profile_with_layers_goes_by_layer_and_batch_size():
    # 8 points per layer at two layers: each (layer, batch size) curve is listed, so 16 points show 16.
    frame = pl.DataFrame({
        "layer": [1] * 4 + [3] * 4 + [1, 3],
        "batch_size": [1, 1, 2, 2] * 2 + [1, 2],
        "tokens": [17, 77] * 4 + [197, 137],
        "status": ["budget"] * 8 + ["ok", "budget"],
    })
    note = budget_note(frame, 0.01, 0.05)
    assert note.startswith("9 point(s) did not reach \u00b11.0% within 0.05 s (layer 1, batch 1: n = 17, 77; "
                           "layer 1, batch 2: n = 17, 77; layer 3, batch 1: n = 17, 77; "
                           "layer 3, batch 2: n = 17, 77, 137);")
