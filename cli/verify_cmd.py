"""``fnconvert verify`` and ``fnconvert predict``: the deploy side, on onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import print_json, user_errors

Provider = Annotated[str, typer.Option(help="onnxruntime provider: auto (CUDA when present) | cpu | cuda.")]


def verify(
    model: Annotated[Path, typer.Argument(help="model_fn.onnx")],
    data: Annotated[str, typer.Option(help=".npz file, ImageFolder tree or torchvision name.")],
    reference: Annotated[Optional[Path], typer.Option(help="model_fn.pt2, or model_fn.pt with --trust-model-code.")] = None,
    atol: Annotated[float, typer.Option(help="Max |onnxruntime − reference| allowed.")] = 1e-4,
    provider: Provider = "auto",
    trust_model_code: Annotated[bool, typer.Option("--trust-model-code", help="Allow a TorchScript reference.")] = False,
    normalize: Annotated[Optional[str], typer.Option(help="Override the preprocessing stored in the model.")] = None,
    data_dir: Annotated[Optional[Path], typer.Option()] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Run MODEL on DATA's test split in onnxruntime: accuracy, and agreement with --reference.

    Example: fnconvert verify out/model_fn.onnx --data cifar10-dev.npz --reference out/model_fn.pt2 --json
    """
    from fnconvert.errors import VerificationError
    from fnconvert.verify import verify_model

    with user_errors():
        result = verify_model(model, data, reference=reference, atol=atol, provider=provider,
                              trust_model_code=trust_model_code, data_dir=data_dir, normalize=normalize)
        if json_out:
            print_json(result)
        else:
            diff = f", max |diff| {result['max_abs_diff']:.3g} (atol {atol})" if "max_abs_diff" in result else ""
            typer.echo(f"accuracy {result['accuracy']:.4f} on {result['samples']} samples{diff}")
        if result.get("passed") is False:
            raise VerificationError(f"{model} differs from {reference} by {result['max_abs_diff']:.3g} > --atol {atol}")


def predict(
    model: Annotated[Path, typer.Argument(help="model_fn.onnx (or any classifier ONNX).")],
    data: Annotated[str, typer.Option(help=".npz / torchvision name (its test split), or a folder of images.")],
    top_k: Annotated[int, typer.Option(help="How many classes to list per sample.")] = 5,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N samples.")] = None,
    provider: Provider = "auto",
    normalize: Annotated[Optional[str], typer.Option(help="Override the preprocessing stored in the model.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print predictions as JSON.")] = False,
) -> None:
    """Top-k predictions of MODEL in onnxruntime.

    Example: fnconvert predict out/model_fn.onnx --data samples/images --top-k 3 --json
    """
    from fnconvert.verify import predict as run

    with user_errors():
        rows = run(model, data, top_k=top_k, limit=limit, provider=provider, normalize=normalize)
        if json_out:
            print_json(rows)
        else:
            for r in rows["predictions"]:
                tops = "  ".join(f"{c['label']}:{c['probability']:.3f}" for c in r["top"])
                typer.echo(f"{r['sample']}: {tops}")
