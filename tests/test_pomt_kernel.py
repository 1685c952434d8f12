"""When POMT's block uses its Triton kernels (received attention, the reduction), and when it falls back.

The kernel's own arithmetic is checked by ``triton_interpreted_checks.py``, which the first
test runs under Triton's interpreter in a child process. The others replace the kernel
module with a stand-in, to check the dispatch: the first-call check, and the fallback to
the chunked product where the kernel fails or is wrong.
"""

from __future__ import annotations

import importlib
import inspect
import os
import platform
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import needs, triton_major
from test_pomt_scores import block_qkv

from pomt_cli import versions
from pomt_cli.pruning import pomt

TESTS = Path(__file__).parent


def need_triton():
    """Triton, which torch brings on Linux x86-64 (CI): missing there, the test fails; elsewhere it skips.

    A Triton older than 3 (torch 2.1 brings 2.1) also skips: the kernel module refuses to
    import there, and pomt uses its product (tests/test_versions.py).
    """
    if platform.system() == "Linux" and platform.machine() == "x86_64":
        import triton
    else:
        triton = pytest.importorskip("triton")
    if triton_major() < 3:  # by the version, so that a refusal on Triton 3 fails the test
        pytest.skip(f"Triton {triton.__version__}: the kernel needs Triton 3 (tests/test_architecture.py "
                    "checks that it refuses to import)")
    importlib.import_module("pomt_cli.pruning.triton_received")
    return triton


def test_the_kernel_passes_its_checks_under_triton_s_interpreter():
    need_triton()
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(TESTS / "triton_interpreted_checks.py")],
                          cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "\n25 passed" in done.stdout, done.stdout[-2000:]


DIVISIBLE_BY_16 = ("q_ptr", "k_ptr", "lse_ptr", "out_ptr", "stride_qb", "stride_qh", "stride_qn", "stride_kb",
                   "stride_kh", "stride_kn")


def ahead_of_time_source(kernel, arg_types: dict[str, str], constexprs: dict[str, int],
                         divisible: tuple[str, ...] = DIVISIBLE_BY_16):
    """``kernel`` specialised for ahead-of-time compilation: its arguments' ``arg_types``, its
    ``constexprs``' values, and the arguments named in ``divisible`` divisible by 16.

    Triton 3.2 and newer (torch 2.6 and newer) take arguments by name and the divisibility as
    attributes; Triton 3.0 and 3.1 (torch 2.4, 2.5) by index, without the constexprs in the
    signature, and the divisibility as an ``AttrsDescriptor``.
    """
    from triton.compiler import ASTSource

    index = kernel.arg_names.index
    if "constexprs" in inspect.signature(ASTSource).parameters:
        attrs = {(index(name),): [["tt.divisibility", 16]] for name in divisible}
        return ASTSource(fn=kernel, signature={**arg_types, **dict.fromkeys(constexprs, "constexpr")}, attrs=attrs,
                         constexprs=constexprs)
    from triton.compiler.compiler import AttrsDescriptor

    return ASTSource(fn=kernel, signature={index(name): t for name, t in arg_types.items() if name not in constexprs},
                     constants={index(name): v for name, v in constexprs.items()},
                     attrs=AttrsDescriptor(divisible_by_16={index(name) for name in divisible}))


@pytest.mark.parametrize("arch", [80, 87, 90])  # A100, Jetson AGX Orin, H100
def test_the_kernel_compiles_to_gpu_code_without_a_gpu_and_spills_no_registers(arch, monkeypatch, tmp_path):
    """Triton compiles ahead of time on any machine (its wheel brings ptxas): every dtype and
    width the block can launch becomes a cubin, so no compiler error waits for the first GPU.

    The arguments are specialised as the JIT specialises deit_small's (pointers and q/k
    strides divisible by 16, so that loads are vectorised); ptxas then reports no spills.
    """
    triton = need_triton()
    from triton.backends.compiler import GPUTarget

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delitem(sys.modules, "pomt_cli.pruning.triton_received", raising=False)
    from pomt_cli.pruning import triton_received

    kernel = triton_received._received_kernel
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    for dtype in ("fp16", "bf16"):
        for width in triton_received.BLOCK_KEYS:
            arg_types = dict.fromkeys(kernel.arg_names, "i32")
            arg_types.update(q_ptr=f"*{dtype}", k_ptr=f"*{dtype}", lse_ptr="*fp32", out_ptr="*fp32", scale="fp32")
            constexprs = {"D": 64, "BLOCK_I": triton_received.BLOCK_QUERIES, "BLOCK_J": width, "BLOCK_D": 64}
            compiled = triton.compile(ahead_of_time_source(kernel, arg_types, constexprs),
                                      target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": triton_received.NUM_WARPS})
            assert len(compiled.asm["cubin"]) > 1000, (dtype, width)
            assert "mma" in compiled.asm["ptx"]  # the logits come from tensor cores
            (tmp_path / "k.ptx").write_text(compiled.asm["ptx"])
            done = subprocess.run([str(ptxas), "-v", f"-arch=sm_{arch}{'a' if arch == 90 else ''}",
                                   str(tmp_path / "k.ptx"), "-o", str(tmp_path / "k.cubin")],
                                  capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            assert "0 bytes spill stores, 0 bytes spill loads" in done.stdout + done.stderr, (dtype, width, done.stderr)


@pytest.mark.parametrize("arch", [80, 87, 90])
def test_the_reduction_kernel_compiles_to_gpu_code_without_a_gpu_and_spills_no_registers(arch, monkeypatch, tmp_path):
    triton = need_triton()
    from triton.backends.compiler import GPUTarget

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delitem(sys.modules, "pomt_cli.pruning.triton_prune", raising=False)
    from pomt_cli.pruning import triton_prune

    kernel = triton_prune._keep_mean_kernel
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    divisible = ("x_ptr", "s_ptr", "out_ptr", "stride_xn", "stride_on")  # deit_small: 384 channels
    for dtype in ("fp16", "bf16", "fp32"):
        arg_types = dict.fromkeys(kernel.arg_names, "i32")
        arg_types.update(x_ptr=f"*{dtype}", s_ptr="*fp32", out_ptr=f"*{dtype}", inv_dropped="fp32")
        constexprs = {"BLOCK_I": triton_prune.BLOCK_TOKENS, "BLOCK_J": triton_prune.BLOCK_TOKENS,
                      "BLOCK_C": triton_prune.BLOCK_CHANNELS}
        compiled = triton.compile(ahead_of_time_source(kernel, arg_types, constexprs, divisible),
                                  target=GPUTarget("cuda", arch, 32), options={"num_warps": triton_prune.NUM_WARPS})
        assert len(compiled.asm["cubin"]) > 1000, dtype
        (tmp_path / "k.ptx").write_text(compiled.asm["ptx"])
        done = subprocess.run([str(ptxas), "-v", f"-arch=sm_{arch}{'a' if arch == 90 else ''}",
                               str(tmp_path / "k.ptx"), "-o", str(tmp_path / "k.cubin")],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "0 bytes spill stores, 0 bytes spill loads" in done.stdout + done.stderr, (dtype, done.stderr)


def test_small_batches_get_narrower_blocks_of_keys_so_that_every_processor_works():
    need_triton()
    from pomt_cli.pruning.triton_received import block_keys

    assert block_keys(256, 196, 132) == 64  # 1,024 programs
    assert block_keys(64, 196, 132) == 64  # 256
    assert block_keys(24, 196, 132) == 32  # 96 programs with 64 keys, 168 with 32
    assert block_keys(16, 196, 132) == 16  # 64, 112, then 208
    assert block_keys(4, 196, 132) == 16  # 52: none reaches 132, the narrowest
    assert block_keys(1, 196, 1) == 64  # the interpreter


def half_block():
    q, k, v, scale, p = block_qkv("vit", img_size=64)
    q, k, v = q.half(), k.half(), v.half()
    _, lse = pomt.attention_lse(q, k, v, scale)
    return q, k, lse, scale, p


@pytest.fixture
def stand_in(monkeypatch):
    """The kernel module replaced by a stand-in whose ``received_attention`` the test sets (the
    reduction's kernel module is missing: that kernel is off)."""
    module = types.ModuleType("pomt_cli.pruning.triton_received")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(sys.modules, "pomt_cli.pruning.triton_prune", None)
    monkeypatch.setattr(pomt, "RECEIVED_KERNEL", {})
    monkeypatch.setattr(pomt, "PRUNE_KERNEL", {})
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the kernel path run on CPU tensors
    return module


def by_product(q, k, lse, scale, p):
    return pomt.received_attention(q, k, lse, scale, p, kernel=False)


@needs(versions.CPU_FLOAT16)
def test_a_kernel_that_agrees_is_checked_once_then_used(stand_in):
    calls = []
    stand_in.received_attention = lambda *args: calls.append(1) or by_product(*args) * (1 + 1e-4)
    q, k, lse, scale, p = half_block()
    first = pomt.received_attention(q, k, lse, scale, p)
    assert pomt.RECEIVED_KERNEL == {("cpu", torch.float16): "triton"}
    second = pomt.received_attention(q, k, lse, scale, p)
    assert len(calls) == 2 and torch.equal(first, second)
    assert torch.equal(first, by_product(q, k, lse, scale, p) * (1 + 1e-4))  # the kernel's result, not the product's


def failing_kernel(calls: list):
    """A stand-in kernel that fails as a missing ptxas does, counting its calls in ``calls``."""

    def broken(*args):
        calls.append(1)
        raise RuntimeError("PTX assembler not found\nmore lines")

    return broken


@needs(versions.CPU_FLOAT16)
def test_a_kernel_that_fails_is_turned_off_once_and_the_product_is_used(stand_in):
    calls = []
    broken = failing_kernel(calls)
    stand_in.received_attention = broken
    q, k, lse, scale, p = half_block()
    for _ in range(2):
        got = pomt.received_attention(q, k, lse, scale, p)
    assert len(calls) == 1
    assert pomt.RECEIVED_KERNEL == {("cpu", torch.float16): "off: RuntimeError: PTX assembler not found"}
    assert torch.equal(got, by_product(q, k, lse, scale, p))


@needs(versions.CPU_FLOAT16)
def test_a_kernel_with_a_wrong_result_is_turned_off(stand_in):
    stand_in.received_attention = lambda *args: by_product(*args) * 1.01
    q, k, lse, scale, p = half_block()
    got = pomt.received_attention(q, k, lse, scale, p)
    assert pomt.RECEIVED_KERNEL[("cpu", torch.float16)].startswith("off: its first result was 1.0e-02 away")
    assert torch.equal(got, by_product(q, k, lse, scale, p))


@needs(versions.CPU_FLOAT16)
def test_a_missing_triton_turns_the_kernel_off(monkeypatch):
    monkeypatch.setitem(sys.modules, "pomt_cli.pruning.triton_received", None)  # import fails
    monkeypatch.setattr(pomt, "RECEIVED_KERNEL", {})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, lse, scale, p = half_block()
    assert torch.equal(pomt.received_attention(q, k, lse, scale, p), by_product(q, k, lse, scale, p))
    assert pomt.RECEIVED_KERNEL[("cpu", torch.float16)].startswith("off: ModuleNotFoundError")


@needs(versions.CPU_FLOAT16)
def test_without_a_gpu_or_the_interpreter_the_kernel_is_not_tried(stand_in, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    stand_in.received_attention = lambda *args: pytest.fail("the kernel ran on the CPU")
    q, k, lse, scale, p = half_block()
    pomt.received_attention(q, k, lse, scale, p)
    pomt.received_attention(q.float(), k.float(), lse, scale, p)
    assert pomt.RECEIVED_KERNEL == {}


@needs(versions.CPU_FLOAT16)
def test_the_lean_scoring_never_uses_the_kernel(stand_in):
    import dataclasses

    from conftest import tiny_vit

    from pomt_cli.pruning import apply

    stand_in.received_attention = lambda *args: pytest.fail("scoring='lean' ran the kernel")
    model = apply(tiny_vit(img_size=64), "pomt", r=20, layer=1).half()
    for blk in model.blocks:
        blk.pomt_plan = dataclasses.replace(blk.pomt_plan, scoring="lean")
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64).half())
    assert pomt.RECEIVED_KERNEL == {}


BENCH = ["bench", "--model", "digits-vit", "--device", "cpu", "--no-lock-clocks", "--dtype", "float16",
         "--batch-size", "2", "-r", "8", "--layer", "1", "--method", "pomt", "--budget", "0.05", "--rounds", "1"]


@needs(versions.CPU_FLOAT16)
def test_bench_records_and_prints_that_the_kernel_ran(tmp_path):
    """The real kernel, under Triton's interpreter in a child process, as it would run on a GPU."""
    need_triton()
    from pomt_cli.formats.bench import read_bench

    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "pomt_cli", *BENCH, "--output-dir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "POMT's attention received: triton kernel" in done.stdout
    _, meta = read_bench(next(tmp_path.glob("*.parquet")))
    assert meta.pomt_received == "triton kernel"


@needs(versions.CPU_FLOAT16)
def test_bench_records_why_the_kernel_was_off_and_nothing_where_it_was_not_tried(stand_in, tmp_path, capsys):
    from conftest import run_in_process

    from pomt_cli.formats.bench import read_bench

    def broken(*args):
        raise RuntimeError("no kernel image is available for execution on the device")

    stand_in.received_attention = broken
    code, out, err = run_in_process([*BENCH, "--output-dir", str(tmp_path / "off")], capsys)
    assert code == 0, err
    why = "chunked product (Triton kernel off: RuntimeError: no kernel image is available for execution on the device)"
    assert f"POMT's attention received: {why}" in " ".join(out.split())
    assert read_bench(next((tmp_path / "off").glob("*.parquet")))[1].pomt_received == why
    code, out, err = run_in_process([*BENCH[:7], "float32", *BENCH[8:], "--output-dir", str(tmp_path / "f32")],
                                    capsys)
    assert code == 0, err
    assert "attention received" not in out
    assert read_bench(next((tmp_path / "f32").glob("*.parquet")))[1].pomt_received is None


@needs(versions.CPU_FLOAT16)
def test_a_profile_of_the_pomt_workload_records_the_path_and_one_of_the_proxy_does_not(stand_in, tmp_path, capsys):
    from conftest import run_in_process

    from pomt_cli.formats.latency import read_latency

    stand_in.received_attention = by_product  # agrees with the check: taken as the kernel
    common = ["profile", "--model", "digits-vit", "--device", "cpu", "--no-lock-clocks", "--dtype", "float16",
              "--batch-size", "1", "--tokens", "65:33:2", "--budget", "0.02"]
    code, _, err = run_in_process([*common, "--method", "pomt", "--layer", "1", "--output-dir", str(tmp_path / "p")],
                                  capsys)
    assert code == 0, err
    assert read_latency(next((tmp_path / "p").glob("*.parquet")))[1].pomt_received == "triton kernel"
    code, _, err = run_in_process([*common, "--output-dir", str(tmp_path / "x")], capsys)
    assert code == 0, err
    assert read_latency(next((tmp_path / "x").glob("*.parquet")))[1].pomt_received is None


@pytest.fixture
def prune_stand_in(monkeypatch):
    """The reduction's kernel module replaced by a stand-in whose ``keep_mean`` the test sets."""
    module = types.ModuleType("pomt_cli.pruning.triton_prune")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(pomt, "PRUNE_KERNEL", {})
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the kernel path run on CPU tensors
    return module


def tokens_and_scores(dtype=torch.float32):
    g = torch.Generator().manual_seed(4)
    return torch.randn(3, 50, 16, generator=g).to(dtype), torch.randn(3, 49, generator=g)


def by_operations(x, scores, r, p):
    return pomt.prune_keep_mean(x, scores, r, p, kernel=False)


def test_a_reduction_kernel_that_agrees_is_checked_once_then_used(prune_stand_in):
    calls = []

    def agrees(x, scores, r, p):  # the mean one rounding step off: within the check's bound
        calls.append(1)
        out = by_operations(x, scores, r, p).clone()
        out[:, -1] = torch.nextafter(out[:, -1], torch.full_like(out[:, -1], float("inf")))
        return out

    prune_stand_in.keep_mean = agrees
    x, scores = tokens_and_scores()
    first = pomt.prune_keep_mean(x, scores, 10, 1)
    assert pomt.PRUNE_KERNEL == {("cpu", torch.float32): "triton"}
    assert pomt.prune_path("cpu", torch.float32) == "triton kernel"
    second = pomt.prune_keep_mean(x, scores, 10, 1)
    assert len(calls) == 2 and torch.equal(first, second) and torch.equal(first, agrees(x, scores, 10, 1))


@pytest.mark.parametrize(("wrong", "why"), [
    (lambda out: out.flip(1), "off: its first result kept other tokens than the tensor operations"),
    (lambda out: torch.cat([out[:, :-1], out[:, -1:] * 1.01], dim=1), "off: its first mean was "),
])
def test_a_reduction_kernel_with_a_wrong_result_is_turned_off(prune_stand_in, wrong, why):
    prune_stand_in.keep_mean = lambda *args: wrong(by_operations(*args))
    x, scores = tokens_and_scores()
    got = pomt.prune_keep_mean(x, scores, 10, 1)
    assert pomt.PRUNE_KERNEL[("cpu", torch.float32)].startswith(why)
    assert pomt.prune_path("cpu", torch.float32).startswith(f"tensor operations (Triton kernel {why}")
    assert torch.equal(got, by_operations(x, scores, 10, 1))


def test_a_reduction_kernel_that_fails_is_turned_off_once(prune_stand_in):
    calls = []
    broken = failing_kernel(calls)
    prune_stand_in.keep_mean = broken
    x, scores = tokens_and_scores()
    for _ in range(2):
        got = pomt.prune_keep_mean(x, scores, 10, 1)
    assert len(calls) == 1 and torch.equal(got, by_operations(x, scores, 10, 1))
    assert pomt.PRUNE_KERNEL == {("cpu", torch.float32): "off: RuntimeError: PTX assembler not found"}


def test_the_reduction_kernel_is_not_tried_with_gradients_without_the_interpreter_or_when_told(prune_stand_in,
                                                                                           monkeypatch):
    prune_stand_in.keep_mean = lambda *args: pytest.fail("the kernel ran")
    x, scores = tokens_and_scores()
    pomt.prune_keep_mean(x.requires_grad_(), scores, 10, 1)
    with torch.no_grad():
        pomt.prune_keep_mean(x, scores, 10, 1, kernel=False)
    monkeypatch.delenv("TRITON_INTERPRET")
    with torch.no_grad():
        pomt.prune_keep_mean(x, scores, 10, 1)
    assert pomt.PRUNE_KERNEL == {}
    assert pomt.prune_path("cpu", torch.float32) is None


def test_the_reduction_kernel_s_check_waits_for_finite_tokens(prune_stand_in):
    prune_stand_in.keep_mean = by_operations  # a kernel that agrees, but NaN never equals itself
    x, scores = tokens_and_scores()
    x[0, 3, 2] = float("nan")
    got = pomt.prune_keep_mean(x, scores, 10, 1)
    assert pomt.PRUNE_KERNEL == {} and torch.equal(got.isnan(), by_operations(x, scores, 10, 1).isnan())
    x[0, 3, 2] = 0.0
    pomt.prune_keep_mean(x, scores, 10, 1)
    assert pomt.PRUNE_KERNEL == {("cpu", torch.float32): "triton"}
