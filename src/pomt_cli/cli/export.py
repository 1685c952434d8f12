"""``pomt export``: a patched model as an ONNX file, checked against PyTorch with ONNX Runtime.

The library (torch, timm) is imported when the command runs, not when ``--help`` is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pomt_cli.cli.options import CheckpointOption, DtypeOption, Method, ModelOption, output_path, seed_option
from pomt_cli.console import plain_console, print_path
from pomt_cli.defaults import DEFAULT_MODEL
from pomt_cli.errors import PomtError
from pomt_cli.options import Dtype

out = plain_console()


#: What --seed seeds in export: the batch the exported graph is checked on.
CheckSeedOption = seed_option("Seeds the random batch that ONNX Runtime is checked on.")

def register(app: typer.Typer) -> None:
    app.command("export", short_help="Export a pruned model to ONNX, checked by ONNX Runtime.")(export)


def export(
    output: Annotated[Path, typer.Option("--output", callback=output_path, help="The .onnx file to write (its folder must exist).")],
    model: ModelOption = DEFAULT_MODEL,
    method: Annotated[Method, typer.Option("--method", help="The token reduction built into the graph.")] = Method.none,
    r: Annotated[int | None, typer.Option("-r", "--r", min=0, help="POMT: tokens pruned in block --layer; ToMe: "
                                          "merged per block; Top-K: pruned per block.")] = None,
    layer: Annotated[int, typer.Option("--layer", min=0, help="POMT's pruning block.")] = 3,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="The graph's static batch size.")] = 1,
    dtype: DtypeOption = Dtype.float32,
    pretrained: Annotated[bool, typer.Option("--pretrained", help="timm's pretrained weights.")] = False,
    checkpoint: CheckpointOption = None,
    opset: Annotated[int, typer.Option("--opset", min=17, help="ONNX opset.")] = 18,
    tolerance: Annotated[float | None, typer.Option(
        "--tolerance", min=0.0, help="Largest ONNX Runtime vs PyTorch difference, relative to the largest logit "
        "(default 1e-4 in float32, 1e-2 in float16, 2e-2 in bfloat16).")] = None,
    seed: CheckSeedOption = 0,
) -> None:
    """Export the model with a token reduction to ONNX (static shapes), check it with ONNX Runtime, keep it only if it matches."""
    from pomt_cli.export import check_output_file, export_onnx, require_onnx
    from pomt_cli.models import create_model, model_line, weights_source
    from pomt_cli.pruning import method_names
    from pomt_cli.pruning.registry import get as get_method

    out.print(model_line(model))
    require_onnx()
    check_output_file(output)
    torch_dtype = dtype.torch
    if not get_method(method.value).takes_layer and layer != 3:
        raise PomtError(f"--layer is POMT's pruning block; {method.value} has no layer: leave --layer out")
    if not get_method(method.value).reduces and r:
        reducing = [m for m in method_names() if get_method(m).reduces]
        raise PomtError(f"-r needs a method: add --method {', '.join(reducing[:-1])} or {reducing[-1]}")
    if get_method(method.value).reduces and r is None:
        # Without -r the graph would be the unpruned model, labelled with the method.
        raise PomtError(f"--method {method.value} needs -r R, the tokens it removes (-r 0 exports the unpruned "
                        "model; so does --method none)")
    r = r or 0
    net = create_model(model, pretrained=pretrained, checkpoint=checkpoint)
    result = export_onnx(net, output, method=method.value, r=r, layer=layer, batch_size=batch_size,
                         dtype=torch_dtype, opset=opset, tolerance=tolerance, seed=seed, model_name=model,
                         weights=str(checkpoint.resolve()) if checkpoint else weights_source(
                             model, pretrained=pretrained, checkpoint=None))
    meta = result.metadata
    out.print(f"exported {model} with {method.value}"
              + (f" r={r}" + (f" at block {layer}" if method is Method.pomt else "") if method is not Method.none else "")
              + f", batch {batch_size}, {meta['dtype']}, opset {result.opset} in {result.export_s:.1f} s")
    out.print(f"tokens entering each block, then leaving the last: {meta['tokens_per_block']}")
    out.print(f"ONNX Runtime against PyTorch on a random batch: max abs difference {result.max_abs_diff:.2e}, "
              f"relative {result.max_rel_diff:.2e} (tolerance {result.tolerance:g})")
    print_path(out, "onnx:", result.path)
