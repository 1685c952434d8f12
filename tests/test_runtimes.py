"""Runtimes: eager, torch.compile and ONNX Runtime give the same logits; the ONNX cache; one-line refusals."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from conftest import needs, runtime_param, tiny_vit

from pomt_cli import versions
from pomt_cli.measure import runtimes
from pomt_cli.errors import PomtError
from pomt_cli.measure.workload import kept_patches
from pomt_cli.pruning import apply
from pomt_cli.measure.runtimes import KeptTokens, Runtime, RuntimeOptions, prepare, runtime_info
from pomt_cli.measure.timing import measure

SETTINGS = {"none": {}, "pomt": {"r": 9, "layer": 1}, "tome": {"r": 3}, "topk": {"r": 2}}


def images(batch_size: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randn(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def workload(kind: str) -> torch.nn.Module:
    """A patched tiny model (class + distillation token, 16 patches, 3 blocks), or the proxy keeping 7 patches."""
    model = tiny_vit("deit_tiny_distilled_patch16_224")
    if kind == "proxy":
        return KeptTokens(model, kept_patches(16, 7, seed=5))
    return apply(model, kind, **SETTINGS[kind])


@pytest.mark.parametrize("runtime", [runtime_param(r) for r in Runtime])
@pytest.mark.parametrize("kind", [*SETTINGS, "proxy"])
def test_every_runtime_gives_the_eager_logits(tmp_path, runtime, kind):
    module, x = workload(kind), images()
    with torch.inference_mode():
        expected = module(x)
    options = RuntimeOptions(cache_dir=tmp_path, compile_backend="eager")
    prepared = prepare(module, x, runtime, label=kind, options=options)
    actual = prepared.fn().clone()
    assert actual.shape == expected.shape == (2, 10)
    assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max()
    # The timing engine takes the call as it is.
    m = measure(prepared.fn, device="cpu", budget_s=0.2, min_samples=3, warmup=1)
    assert m.samples >= 1 and m.median_ms > 0
    if runtime is Runtime.onnxruntime:
        assert prepared.providers == ("CPUExecutionProvider",) and prepared.path.parent == tmp_path
        assert not prepared.cached and prepared.max_rel_diff < 1e-4


def test_the_proxy_wrapper_runs_the_kept_tokens_only():
    module, x = workload("proxy"), images()
    dropped = KeptTokens(module.model, kept_patches(16, 8, seed=5))
    with torch.inference_mode():
        assert not torch.allclose(module(x), dropped(x))


@needs(versions.COMPILE)
def test_a_compiled_workload_is_warmed_up_on_a_copy(tmp_path):
    torch._dynamo.reset()
    module, x = workload("pomt"), images()
    with torch.inference_mode():
        expected = module(x)
    prepared = prepare(module, x, Runtime.compile, options=RuntimeOptions(compile_backend="inductor"))
    assert prepared.setup_s > 0 and 0 <= prepared.max_rel_diff <= 1e-4
    apply(module, "pomt", r=4, layer=1)  # a later patch of the module does not change the compiled copy
    torch.testing.assert_close(prepared.fn(), expected, rtol=1e-4, atol=1e-5)


@needs(versions.COMPILE)
def test_a_compiler_that_gets_the_logits_wrong_is_refused_in_one_line():
    """As inductor's CPU scatter_add did for ToMe on torch 2.5.1: the compiled logits are
    checked against eager PyTorch's before anything is timed."""
    from torch._dynamo import list_backends, register_backend

    if "pomt_test_off_by_1pc" not in list_backends(exclude_tags=()):
        @register_backend(name="pomt_test_off_by_1pc")
        def off_by_1pc(gm, example_inputs):
            def run(*args):
                out = gm(*args)
                return type(out)(o * 1.01 for o in out) if isinstance(out, (tuple, list)) else out * 1.01

            return run

    torch._dynamo.reset()
    with pytest.raises(PomtError) as e:
        prepare(workload("tome"), images(), Runtime.compile, label="tome r=3",
                options=RuntimeOptions(compile_backend="pomt_test_off_by_1pc"))
    message = str(e.value)
    assert "\n" not in message and message.startswith("deit_tiny_distilled_patch16_224 tome r=3: torch.compile's")
    assert "differ from eager PyTorch's by 1.00e-02" in message and "above the tolerance 0.0001" in message


@needs(versions.COMPILE)
def test_a_workload_that_does_not_compile_is_refused_in_one_line():
    class Breaks(torch.nn.Module):
        def forward(self, x):
            print("a graph break")
            return x * 2

    with pytest.raises(PomtError, match=r"does not compile as one graph .*use --runtime eager or onnxruntime") as e:
        prepare(Breaks(), images(), Runtime.compile, label="odd", options=RuntimeOptions(compile_backend="eager"))
    assert "\n" not in str(e.value)


@needs(versions.ONNX_EXPORT)
def test_the_onnx_cache_reuses_a_graph_and_a_changed_setting_makes_a_new_one(tmp_path):
    options = RuntimeOptions(cache_dir=tmp_path)
    x = images()
    first = prepare(workload("pomt"), x, Runtime.onnxruntime, label="pomt", options=options)
    before = runtimes.exports_done
    stamp = first.path.stat().st_mtime_ns
    again = prepare(workload("pomt"), x, Runtime.onnxruntime, label="pomt", options=options)
    assert again.cached and again.path == first.path and runtimes.exports_done == before
    assert first.path.stat().st_mtime_ns == stamp
    torch.testing.assert_close(again.fn(), first.fn())
    other = apply(workload("none"), "pomt", r=4, layer=1)
    changed = prepare(other, x, Runtime.onnxruntime, label="pomt", options=options)
    assert not changed.cached and changed.path != first.path and runtimes.exports_done == before + 1
    batch = prepare(workload("pomt"), images(3), Runtime.onnxruntime, label="pomt", options=options)
    assert not batch.cached and len(list(tmp_path.iterdir())) == 3
    other_weights = workload("pomt")
    with torch.no_grad():
        other_weights.head.weight.mul_(2)
    assert prepare(other_weights, x, Runtime.onnxruntime, label="pomt", options=options).path.name not in {
        p.path.name for p in (first, changed, batch)}


@needs(versions.ONNX_EXPORT)
def test_a_graph_outside_the_tolerance_leaves_no_file(tmp_path):
    with pytest.raises(PomtError, match="above the tolerance 0: the graph was not kept"):
        prepare(workload("pomt"), images(), Runtime.onnxruntime, options=RuntimeOptions(cache_dir=tmp_path,
                                                                                         tolerance=0.0))
    assert [p for p in tmp_path.iterdir()] == []


@needs(versions.ONNX_EXPORT)
def test_without_the_extra_onnxruntime_is_refused_naming_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(PomtError) as e:
        prepare(workload("none"), images(), Runtime.onnxruntime, options=RuntimeOptions(cache_dir=tmp_path))
    assert str(e.value) == ('onnxruntime not installed: install the onnx extra: pip install -e ".[onnx]" (onnx, '
                            "onnxruntime, onnxscript)")
    assert list(tmp_path.iterdir()) == []
    assert runtime_info(Runtime.eager)["runtime"] == "eager"  # the other runtimes need no extra


@needs(versions.ONNX_EXPORT)
@pytest.mark.parametrize("providers, device, message", [
    (("NoSuchExecutionProvider",), "cpu", "--ort-providers NoSuchExecutionProvider is not available here "
                                          "(available: "),
    (("cuda",), "cpu", "is not available here"),
    ((), "cpu", "--ort-providers is empty"),
])
def test_an_unavailable_provider_is_refused_in_one_line(tmp_path, providers, device, message):
    options = RuntimeOptions(cache_dir=tmp_path, providers=providers)
    with pytest.raises(PomtError, match=re.escape(message)) as e:
        runtimes.check_runtime(Runtime.onnxruntime, device=device, options=options)
    assert "\n" not in str(e.value) and "CPUExecutionProvider" in str(e.value)
    with pytest.raises(PomtError, match=re.escape(message)):
        prepare(workload("none"), images(), Runtime.onnxruntime, options=options)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("runtime, dtype, message", [
    (Runtime.compile, torch.float32, "--cuda-graphs times eager PyTorch only: leave it out with --runtime compile"),
    (Runtime.onnxruntime, torch.float32, "leave it out with --runtime onnxruntime"),
    runtime_param(Runtime.onnxruntime, torch.bfloat16, "takes float32, not bfloat16: use --dtype float32"),
])
def test_unsupported_combinations_are_refused_in_one_line(runtime, dtype, message):
    options = RuntimeOptions(cuda_graphs=dtype == torch.float32)
    with pytest.raises(PomtError, match=message):
        runtimes.check_runtime(runtime, device="cpu", dtype=dtype, options=options)


@pytest.mark.parametrize("available, expected", [
    (["CPUExecutionProvider"], None),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], ("CUDAExecutionProvider", "CPUExecutionProvider")),
    (["CPUExecutionProvider", "TensorrtExecutionProvider", "CUDAExecutionProvider"],
     ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")),
])
def test_a_cuda_device_needs_a_gpu_provider(monkeypatch, available, expected):
    # Seen on an H200: a CPU-only onnxruntime on a CUDA device reached the I/O binding of CUDA
    # tensors and died there with a traceback. It must be refused in one line before anything runs.
    monkeypatch.setattr(runtimes, "available_providers", lambda: list(available))
    if expected is None:
        message = "this onnxruntime has no GPU provider (available: CPUExecutionProvider); install onnxruntime-gpu"
        for call in (lambda: runtimes.resolve_providers(None, "cuda"),
                     lambda: runtimes.check_runtime(Runtime.onnxruntime, device="cuda")):
            with pytest.raises(PomtError, match=re.escape(message)) as e:
                call()
            assert "\n" not in str(e.value)
    else:
        assert runtimes.resolve_providers(None, "cuda") == expected
    assert runtimes.resolve_providers(None, "cpu") == ("CPUExecutionProvider",)


@needs(versions.ONNX_EXPORT)
def test_provider_names_and_runtime_info():
    assert runtimes.resolve_providers(None, "cpu") == ("CPUExecutionProvider",)
    assert runtimes.resolve_providers(["cpu"], "cpu") == ("CPUExecutionProvider",)
    info = runtime_info(Runtime.onnxruntime, RuntimeOptions(opset=17))
    assert info["providers"] == ["CPUExecutionProvider"] and info["opset"] == 17
    assert info["exporters"] == ["torchscript", "dynamo"]
    assert info["onnxruntime_version"] and info["torch_version"] == torch.__version__
    assert runtime_info(Runtime.compile)["compile_backend"] == "inductor"
    assert runtime_info(Runtime.compile)["providers"] is None


@needs(versions.COMPILE)
def test_the_recompile_limits_go_by_the_names_this_torch_has():
    # recompile_limit on a new torch, cache_size_limit on 2.2 to 2.5 (measured): a name this
    # torch lacks would stop every compile with a KeyError.
    limits = runtimes.recompile_limits(7)
    assert len(limits) == 2 and set(limits.values()) == {7}
    before = {name: getattr(torch._dynamo.config, name) for name in limits}
    with torch._dynamo.config.patch(limits):
        assert {name: getattr(torch._dynamo.config, name) for name in limits} == limits
    assert {name: getattr(torch._dynamo.config, name) for name in limits} == before


@needs(versions.ONNX_EXPORT)
def test_an_exported_pomt_reduction_breaks_ties_as_the_eager_one(tmp_path):
    """Eager POMT sorts its scores stably (equal scores: the lower index first); an export
    cannot carry a stable sort, and its TopK breaks ties by the lower index, the same rule."""
    import warnings

    import onnxruntime

    from pomt_cli.pruning import pomt

    class Reduction(torch.nn.Module):
        def forward(self, x, scores):
            return pomt.prune_keep_mean(x, scores, 3, 1)

    x = torch.arange(60.0).reshape(2, 30, 1)
    scores = torch.zeros(2, 29)
    scores[:, 20:] = 1.0  # 9 tokens tie at the top, 20 at the bottom
    scores[1, 3] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Reduction(), (x, scores), tmp_path / "r.onnx", dynamo=True, opset_version=18)
    session = onnxruntime.InferenceSession(str(tmp_path / "r.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), (x, scores))})
    expected = pomt.prune_keep_mean(x, scores, 3, 1)
    assert expected[1, :, 0].tolist()[:5] == [30.0, 31.0, 32.0, 33.0, 34.0]  # the lowest of the tied tokens
    assert torch.equal(torch.from_numpy(got), expected)
