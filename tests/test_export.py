"""pomt export: ONNX graphs of every method, checked with ONNX Runtime, kept only when they match."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import needs, run_in_process, tiny_vit

from safetensors.torch import save_file

from pomt_cli import versions
from pomt_cli.errors import PomtError
from pomt_cli.export import export_onnx
from pomt_cli.models import create_model, state_dict_sha256

SETTINGS = {"none": {}, "pomt": {"r": 9, "layer": 1}, "tome": {"r": 3}, "topk": {"r": 2}}


def props(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@needs(versions.ONNX_EXPORT)
@pytest.mark.parametrize("method", list(SETTINGS))
def test_every_method_exports_and_runs_in_onnx_runtime_as_in_pytorch(tmp_path, method):
    model = tiny_vit("deit_tiny_distilled_patch16_224")  # class + distillation token, 16 patches, 3 blocks
    result = export_onnx(model, tmp_path / "m.onnx", method=method, batch_size=3, **SETTINGS[method])
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    meta = props(result.path)
    expected_counts = {"none": [18] * 4, "pomt": [18, 18, 9, 9], "tome": [18, 15, 12, 9], "topk": [18, 16, 14, 12]}
    assert json.loads(meta["tokens_per_block"]) == expected_counts[method]
    assert meta["method"] == method and meta["opset"] == "18" and meta["batch_size"] == "3"
    assert float(meta["max_rel_diff"]) == pytest.approx(result.max_rel_diff, rel=1e-3) and result.max_rel_diff < 1e-4
    # An independent check: ONNX Runtime on other images than the exporter's own check.
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    from pomt_cli.pruning import apply

    with torch.no_grad():
        expected = apply(model, method, **SETTINGS[method]).float()(images).numpy()
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    actual = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    assert np.abs(actual - expected).max() <= 1e-4 * np.abs(expected).max()


@needs(versions.ONNX_EXPORT)
def test_a_graph_outside_the_tolerance_is_not_kept(tmp_path):
    (tmp_path / "m.onnx").write_text("an older file")
    with pytest.raises(PomtError, match="above the tolerance 0: the file was not kept"):
        export_onnx(tiny_vit(), tmp_path / "m.onnx", method="pomt", r=4, layer=1, tolerance=0.0)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"] and (tmp_path / "m.onnx").read_text() == "an older file"


@needs(versions.ONNX_EXPORT)
def test_the_command_writes_the_file_and_prints_the_difference(tmp_path, capsys):
    code, stdout, stderr = run_in_process(["export", "--model", "digits-vit", "--method", "pomt", "-r", "16",
                                           "--layer", "1", "--output", str(tmp_path / "d.onnx")], capsys)
    assert code == 0, stderr
    assert "tokens entering each block, then leaving the last: [65, 65, 49, 49, 49]" in stdout
    assert "ONNX Runtime against PyTorch" in stdout
    meta = props(tmp_path / "d.onnx")
    assert meta["model"] == "digits-vit" and meta["weights"] == "bundled"
    assert meta["weights_sha256"] == state_dict_sha256(create_model("digits-vit"))


@needs(versions.ONNX_EXPORT)
def test_the_file_names_its_checkpoint_and_the_weights_hash(tmp_path, capsys):
    model = create_model("digits-vit")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.bias"] = state["head.bias"] + 1.0
    save_file(state, str(tmp_path / "tuned.safetensors"))
    code, _, stderr = run_in_process(["export", "--model", "digits-vit", "--checkpoint", str(tmp_path / "tuned.safetensors"),
                                      "--output", str(tmp_path / "d.onnx")], capsys)
    assert code == 0, stderr
    meta = props(tmp_path / "d.onnx")
    assert meta["weights"] == str((tmp_path / "tuned.safetensors").resolve())
    tuned = create_model("digits-vit", checkpoint=tmp_path / "tuned.safetensors")
    assert meta["weights_sha256"] == state_dict_sha256(tuned) != state_dict_sha256(model)


@needs(versions.ONNX_EXPORT)
@pytest.mark.parametrize("args, message", [
    (["--output", "{tmp}/missing/d.onnx"], "the folder {tmp}/missing does not exist"),
    (["--output", "{tmp}"], "is a folder"),
    (["--output", "{tmp}/d.txt"], "give a file name ending in .onnx"),
    (["--output", "{tmp}/d.onnx", "-r", "4"], "-r needs a method"),
    (["--output", "{tmp}/d.onnx", "--method", "topk", "-r", "2", "--layer", "1"], "topk has no layer"),
    (["--output", "{tmp}/d.onnx", "--method", "pomt", "-r", "90", "--layer", "1"], "r=90 is too large"),
    (["--output", "{tmp}/d.onnx", "--method", "merge"], "Invalid value for '--method'"),
    (["--output", "{tmp}/d.onnx", "--method", "pomt"], "--method pomt needs -r R, the tokens it removes"),
    (["--output", "{tmp}/d.onnx", "--method", "topk"], "--method topk needs -r R"),
])
def test_bad_input_is_one_line_with_exit_code_2_and_nothing_written(tmp_path, capsys, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    code, stdout, stderr = run_in_process(["export", "--model", "digits-vit", *args], capsys)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message.format(tmp=tmp_path) in lines[0], stderr
    assert list(tmp_path.iterdir()) == []


@needs(versions.ONNX_EXPORT)
def test_without_the_extra_the_error_names_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    code, _, stderr = run_in_process(["export", "--model", "digits-vit", "--output", str(tmp_path / "d.onnx")], capsys)
    assert code == 2 and stderr.strip() == (
        'error: onnxruntime not installed: install the onnx extra: pip install -e ".[onnx]" (onnx, onnxruntime, '
        "onnxscript)")
    assert list(tmp_path.iterdir()) == []


@needs(versions.COMPILE)
@pytest.mark.parametrize("method", list(SETTINGS))
def test_torch_compile_takes_every_method_as_one_graph(method):
    from pomt_cli.pruning import apply

    torch._dynamo.reset()
    model = apply(tiny_vit("deit_tiny_distilled_patch16_224"), method, **SETTINGS[method])
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(images)
        actual = torch.compile(model, fullgraph=True, backend="eager")(images)  # a graph break raises
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
