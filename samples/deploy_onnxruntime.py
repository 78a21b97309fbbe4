"""Deploy an FN model with onnxruntime, two ways.

    python samples/deploy_onnxruntime.py OUT            # OUT is a `fnconvert transform` output folder

1. The drop-in: model_fn.onnx takes the original input and returns the original output; the factor split lives
   inside the graph. This is what production code should use.
2. Split outside the graph, with the stored statistics (factors.npz: mean, V, B, singular_values): compute
   z = (x − μ)·V and the residual r = x − z·B yourself. This shows what the graph does, and lets a user feed the
   factor to other systems. The two must agree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


def main(out: Path, data: Path) -> None:
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    sess = ort.InferenceSession(str(out / "model_fn.onnx"), providers=providers)
    name = sess.get_inputs()[0].name
    report = json.loads((out / "report.json").read_text())

    with np.load(data, allow_pickle=False) as z:
        x_raw, y = z["x_test"][:64], z["y_test"][:64]
    # The preprocessing fnconvert recorded: uint8 HWC images → float32 NCHW in [0, 1] (then --normalize, if any).
    x = x_raw.transpose(0, 3, 1, 2).astype(np.float32) / 255
    norm = report["preprocessing"]["normalize"]
    if norm:
        x = (x - np.float32(norm["mean"]).reshape(1, -1, 1, 1)) / np.float32(norm["std"]).reshape(1, -1, 1, 1)

    logits = sess.run(None, {name: x})[0]
    print(f"drop-in model_fn.onnx: accuracy {np.mean(logits.argmax(1) == y):.3f} on {len(y)} test images")

    f = np.load(out / "factors.npz", allow_pickle=False)
    flat = x.reshape(len(x), -1).astype(np.float64)
    z_fac = (flat - f["mean"]) @ f["V"]  # (n_samples, d): the factor
    resid = (flat - z_fac @ f["B"]).reshape(x.shape)  # what the original model sees inside the FN graph
    print(f"factor z: shape {z_fac.shape}, std {z_fac.std(0).round(3)}; residual std {resid.std():.4f} "
          f"vs input std {x.std():.4f}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python samples/deploy_onnxruntime.py OUT [DATA.npz]")
    here = Path(__file__).resolve().parent
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else here / "cifar10-sample.npz")
