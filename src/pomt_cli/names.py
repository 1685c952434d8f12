"""The names users choose from: methods, estimators, workloads, runtimes, ONNX Runtime providers.

Standard library only, so that ``pomt --help``, shell completion and a misspelled choice
answer without importing torch. :data:`WORKLOADS`, :class:`Runtime` and
:data:`PROVIDER_ALIASES` are defined here once (``formats.latency`` and
``measure.runtimes`` import them). The method names mirror the method registry, which
fills as ``pomt_cli.pruning`` imports each method's module; tests/test_startup.py checks
that they are the registered built-ins and the estimators of ``formats.accuracy``.
"""

from __future__ import annotations

from enum import Enum

#: The built-in token-reduction methods, in the order ``pomt_cli.pruning`` registers them.
METHODS: tuple[str, ...] = ("none", "pomt", "tome", "topk")
#: The method every other is compared with: the unpatched model (``pomt_cli.bench.BASELINE``).
BASELINE = "none"
#: The paper's accuracy estimate, which is no pruning method: random tokens kept from the start.
RANDOM = "random"
#: The accuracy estimators: :data:`RANDOM`, then every built-in method that reduces tokens.
ESTIMATORS: tuple[str, ...] = (RANDOM, "pomt", "tome", "topk")
#: What ``pomt profile`` times: the all-blocks proxy (the paper's) or the POMT-patched model.
WORKLOADS: tuple[str, ...] = ("proxy", "pomt")


class Runtime(str, Enum):
    """What runs the forward pass that is timed."""

    eager = "eager"
    compile = "compile"
    onnxruntime = "onnxruntime"


#: Short names accepted by ``--ort-providers``.
PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider"}
