"""On a torch too old for a feature (a Jetson's 2.1), the feature refuses in one line, before any work.

The tests make the version check see torch 2.1.2 (``torch.__version__`` patched), so they
run, and can fail, on the newest torch too.
"""

from __future__ import annotations

import re
import sys

import pytest
import torch

from conftest import MODEL, image_folder, run_in_process
from pomt_cli import versions
from pomt_cli.errors import PomtError
from pomt_cli.measure.runtimes import Runtime, check_runtime
from pomt_cli.pruning import pomt

JETSON = "2.1.2+cu121"


@pytest.fixture
def old_torch(monkeypatch):
    monkeypatch.setattr(torch, "__version__", JETSON)


@pytest.mark.parametrize("version, expected", [
    ("2.1.2+cu121", (2, 1)), ("2.3.0a0+40ec155e58.nv24.03", (2, 3)), ("2.14.1", (2, 14)), ("10.0", (10, 0))])
def test_release_reads_major_and_minor(version, expected):
    assert versions.release(version) == expected


#: What each gated feature's refusal says it needs: the bounds measured on torch 2.1 to 2.7.
NEEDS = {"ONNX export": "torch 2.5 or newer", "--runtime compile": "torch 2.7 or newer",
         "--dtype float16 on the CPU": "torch 2.3 or newer"}


@pytest.mark.parametrize("feature, version, ok", [
    *[(versions.COMPILE, v, ok) for v, ok in [
        ("2.1.2+cu121", False), ("2.2.0a0+6a974be", False), ("2.4.1", False), ("2.5.0a0+872d972e41.nv24.08", False),
        ("2.5.1", False), ("2.6.0", False), ("2.6.0a0+ecf3bae40a.nv25.01", False), ("2.7.0", True),
        ("2.7.1", True), ("2.14.1", True), ("3.0.0", True)]],
    *[(versions.CPU_FLOAT16, v, ok) for v, ok in [
        ("2.1.0a0+41361538.nv23.06", False), ("2.2.2", False), ("2.3.0a0+40ec155e58.nv24.03", True),
        ("2.4.0a0+07cecf4168.nv24.05", True), ("2.14.1", True)]]])
def test_each_feature_needs_the_torch_it_was_measured_to_work_on(monkeypatch, feature, version, ok):
    # Measured: compile fails on 2.2 to 2.4 (dynamo stops at the block's setattr), gives
    # wrong ToMe logits with inductor on 2.5.1 and 2.6.0, and is right for every method on
    # 2.7.1; half LayerNorm is missing on 2.2.2's CPU, not 2.3.1's.
    monkeypatch.setattr(torch, "__version__", version)
    assert versions.supported(feature) is ok
    if ok:
        versions.require(feature)
    else:
        with pytest.raises(PomtError, match=rf"^{re.escape(feature.what)} needs {NEEDS[feature.what]} "
                                            rf"\(this is {re.escape(version)};"):
            versions.require(feature)


@pytest.mark.parametrize("version, ok", [
    ("2.1.2+cu121", False), ("2.3.0a0+40ec155e58.nv24.03", False), ("2.4.1", False), ("2.5.0", True),
    ("2.5.0a0+872d972e41.nv24.08", True), ("2.14.1", True)])
def test_onnx_export_needs_the_torch_its_documentation_names(monkeypatch, version, ok):
    # torch.onnx.export(dynamo=True): PyTorch's ONNX tutorial requires 2.5.0 or newer.
    monkeypatch.setattr(torch, "__version__", version)
    assert versions.supported(versions.ONNX_EXPORT) is ok
    if ok:
        versions.require(versions.ONNX_EXPORT)
    else:
        with pytest.raises(PomtError, match=rf"^ONNX export needs torch 2\.5 or newer \(this is {re.escape(version)};"):
            versions.require(versions.ONNX_EXPORT)


def test_the_refusal_names_the_version_and_what_to_do(old_torch):
    with pytest.raises(PomtError) as caught:
        versions.require(versions.ONNX_EXPORT)
    assert str(caught.value) == ("ONNX export needs torch 2.5 or newer (this is 2.1.2+cu121; tested with "
                                 f"{versions.TESTED}): upgrade torch, or time with --runtime eager")


def test_only_float16_on_the_cpu_is_refused(old_torch):
    with pytest.raises(PomtError, match="--dtype float16 on the CPU needs torch 2.3 or newer"):
        check_runtime(Runtime.eager, device="cpu", dtype=torch.float16)
    check_runtime(Runtime.eager, device="cpu", dtype=torch.bfloat16)  # torch 2.1 runs it
    check_runtime(Runtime.eager, device="cpu", dtype=torch.float32)
    versions.require_dtype_on("cuda", torch.float16)


def test_compile_is_refused_before_its_backend_is_looked_up(old_torch):
    with pytest.raises(PomtError, match="--runtime compile needs torch 2.7 or newer"):
        check_runtime(Runtime.compile, device="cpu")
    check_runtime(Runtime.eager, device="cpu")


@pytest.mark.parametrize("args, what", [
    (["export", "--model", MODEL, "--output", "{tmp}/out/model.onnx"], "ONNX export"),
    (["profile", "--device", "cpu", "--model", MODEL, "--batch-size", "1", "--runtime", "onnxruntime",
      "--output-dir", "{tmp}/out"], "ONNX export"),
    (["profile", "--device", "cpu", "--model", MODEL, "--batch-size", "1", "--runtime", "compile",
      "--output-dir", "{tmp}/out"], "--runtime compile"),
    (["profile", "--device", "cpu", "--model", MODEL, "--batch-size", "1", "--dtype", "float16",
      "--output-dir", "{tmp}/out"], "--dtype float16 on the CPU"),
    (["bench", "--device", "cpu", "--model", MODEL, "--batch-size", "1", "--runtime", "eager,compile",
      "--output-dir", "{tmp}/out"], "--runtime compile"),
    (["export", "--model", MODEL, "--dtype", "float16", "--output", "{tmp}/out/model.onnx"], "ONNX export"),
])
def test_the_commands_refuse_in_one_line_and_write_nothing(old_torch, tmp_path, capsys, args, what):
    (tmp_path / "out").mkdir()
    code, out, err = run_in_process([a.replace("{tmp}", str(tmp_path)) for a in args], capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {what} needs {NEEDS[what]} (this is 2.1.2")
    assert "Traceback" not in out + err
    assert list((tmp_path / "out").iterdir()) == []


def test_estimate_accuracy_refuses_float16_on_the_cpu(old_torch, tmp_path, capsys):
    data = image_folder(tmp_path / "data", {"a": 2, "b": 2})
    (tmp_path / "out").mkdir()
    code, out, err = run_in_process(["estimate-accuracy", "--model", MODEL, "--data", str(data), "--dtype", "float16",
                                     "--torch-device", "cpu", "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 2, (out, err)
    assert err.strip().splitlines() == [
        f"error: --dtype float16 on the CPU needs torch 2.3 or newer (this is {JETSON}; tested with "
        f"{versions.TESTED}): use --dtype bfloat16 or float32, or upgrade torch"]
    assert list((tmp_path / "out").iterdir()) == []


def test_an_old_triton_turns_the_kernel_off_and_the_product_runs(monkeypatch):
    """Triton 2 (torch 2.1's) has no ``triton.backends``: the kernel module refuses to import."""
    pytest.importorskip("triton")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton.backends"
                        else real(name, *a))
    monkeypatch.delitem(sys.modules, "pomt_cli.pruning.triton_received", raising=False)
    monkeypatch.delitem(sys.modules, "pomt_cli.pruning.triton_prune", raising=False)
    monkeypatch.setattr(pomt, "RECEIVED_KERNEL", {})
    monkeypatch.setattr(pomt, "PRUNE_KERNEL", {})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 16, dtype=torch.bfloat16) for _ in range(3))  # torch 2.1 has no CPU half
    _, lse = pomt.attention_lse(q, k, v, 0.25)
    got = pomt.received_attention(q, k, lse, 0.25, 1)
    assert torch.equal(got, pomt.received_attention(q, k, lse, 0.25, 1, kernel=False))
    assert pomt.received_path("cpu", torch.bfloat16).startswith(
        "chunked product (Triton kernel off: ImportError: Triton ")
    assert "is too old for the kernel: it needs Triton 3 (triton.backends)" in pomt.received_path("cpu", torch.bfloat16)
    x, scores = torch.randn(2, 17, 8, dtype=torch.bfloat16), torch.randn(2, 16)
    with torch.no_grad():
        got = pomt.prune_keep_mean(x, scores, 5, 1)
    assert torch.equal(got, pomt.prune_keep_mean(x, scores, 5, 1, kernel=False))
    assert pomt.prune_path("cpu", torch.bfloat16).startswith("tensor operations (Triton kernel off: ImportError: Triton ")
