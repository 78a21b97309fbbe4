"""fnconvert.models: format detection from content (never the extension), safe loading, refusals.

Each loaded model is checked against the original module's outputs on the same input.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from conftest import deny_reading
from fnconvert.errors import FnconvertError
from fnconvert.models import detect_format, load_model

X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def _same_outputs(a, b, x=X, atol=1e-6):
    with torch.no_grad():
        np.testing.assert_allclose(a(x).numpy(), b(x).numpy(), atol=atol, rtol=0)


def _quiet_export_save(module, x, path):
    ep = torch.export.export(module, (x,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(ep, str(path))


# ------------------------------------------------------------------------------------------------ detection


def test_format_detected_from_content_not_extension(tmp_path, tiny):
    from safetensors.torch import save_file

    torch.jit.save(torch.jit.script(tiny), str(tmp_path / "a.safetensors"))
    torch.save(tiny.state_dict(), tmp_path / "b.onnx")
    torch.save(tiny.state_dict(), tmp_path / "c.pt2", _use_new_zipfile_serialization=False)
    _quiet_export_save(tiny, X, tmp_path / "d.pt")
    save_file(tiny.state_dict(), str(tmp_path / "e.pt"))
    torch.onnx.export(tiny, (X,), str(tmp_path / "f.safetensors"), dynamo=False)
    assert detect_format(tmp_path / "a.safetensors") == "torchscript"
    assert detect_format(tmp_path / "b.onnx") == "torch-zip"
    assert detect_format(tmp_path / "c.pt2") == "torch-legacy"
    assert detect_format(tmp_path / "d.pt") == "pt2"
    assert detect_format(tmp_path / "e.pt") == "safetensors"
    assert detect_format(tmp_path / "f.safetensors") == "onnx"


@pytest.mark.parametrize("header_len", [128, 130, 255, 2698])
def test_safetensors_whose_header_length_looks_like_a_pickle(tmp_path, header_len):
    """The 8-byte header length may start with 0x80 (the pickle PROTO opcode) or 0x8a 0x0a (legacy torch magic)."""
    import json

    from safetensors.torch import load_file

    w = np.arange(6, dtype=np.float32)
    header = json.dumps({"fc.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}).encode()
    header += b" " * (header_len - len(header))  # the format pads its JSON header with spaces
    path = tmp_path / "w.bin"
    path.write_bytes(header_len.to_bytes(8, "little") + header + w.tobytes())
    np.testing.assert_array_equal(load_file(str(path))["fc.weight"].numpy().ravel(), w)  # a valid file
    assert detect_format(path) == "safetensors", path.read_bytes()[:12]
    with pytest.raises(FnconvertError, match="is a state_dict"):  # read as data, not refused as a pickle
        load_model(path)


# ------------------------------------------------------------------------------------------------ loading


def test_torchscript_renamed_bin_needs_trust_and_loads(tmp_path, tiny):
    path = tmp_path / "model.bin"
    torch.jit.save(torch.jit.script(tiny), str(path))
    with pytest.raises(FnconvertError, match="--trust-model-code") as e:
        load_model(path)
    assert "TorchScript" in str(e.value) and str(path) in str(e.value)
    loaded = load_model(path, trust_model_code=True)
    assert loaded.format == "torchscript" and loaded.is_torchscript and not loaded.module.training
    _same_outputs(loaded.module, tiny)
    import hashlib

    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_state_dict_renamed_bin_with_arch(tmp_path, r18):
    path = tmp_path / "weights.bin"
    torch.save(r18.state_dict(), path)
    loaded = load_model(path, arch="resnet18")
    assert (loaded.format, loaded.arch) == ("state_dict", "resnet18")
    assert loaded.module.fc.out_features == 10  # num_classes read from the state_dict
    _same_outputs(loaded.module, r18, torch.randn(2, 3, 32, 32), atol=1e-5)


def test_state_dict_nested_in_a_checkpoint_and_legacy_format(tmp_path, r18):
    torch.save({"epoch": 3, "state_dict": r18.state_dict()}, tmp_path / "ckpt.pt")
    _same_outputs(load_model(tmp_path / "ckpt.pt", arch="resnet18").module, r18, torch.randn(1, 3, 32, 32), 1e-5)
    torch.save(r18.state_dict(), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    _same_outputs(load_model(tmp_path / "legacy.pth", arch="resnet18").module, r18, torch.randn(1, 3, 32, 32), 1e-5)


def test_safetensors_state_dict(tmp_path, r18):
    from safetensors.torch import save_file

    path = tmp_path / "r18.safetensors"
    save_file(r18.state_dict(), str(path))
    loaded = load_model(path, arch="resnet18")
    assert loaded.format == "safetensors"
    _same_outputs(loaded.module, r18, torch.randn(2, 3, 32, 32), atol=1e-5)


def test_pt2_from_torch_export(tmp_path, tiny):
    path = tmp_path / "prog.pt2"
    _quiet_export_save(tiny, X, path)
    loaded = load_model(path)  # data, not code: no trust flag needed
    assert loaded.format == "pt2"
    _same_outputs(loaded.module, tiny)
    loaded.module.eval()  # fnconvert switches modes around evaluation: must not raise
    loaded.module.train()


def test_pickled_module_needs_trust(tmp_path, tiny):
    path = tmp_path / "whole.pt"
    torch.save(tiny, path)
    with pytest.raises(FnconvertError, match="pickled Python object") as e:
        load_model(path)
    assert "--trust-model-code" in str(e.value)
    loaded = load_model(path, trust_model_code=True)
    assert loaded.format == "pickled-module"
    _same_outputs(loaded.module, tiny)


# ------------------------------------------------------------------------------------------------ refusals


def test_state_dict_arch_refusals(tmp_path, r18):
    path = tmp_path / "sd.pt"
    torch.save(r18.state_dict(), path)
    with pytest.raises(FnconvertError, match="--arch NAME"):
        load_model(path)
    with pytest.raises(FnconvertError, match="'resnet' is not a torchvision") as e:
        load_model(path, arch="resnet")
    assert "resnet18" in str(e.value)  # suggests close names
    with pytest.raises(FnconvertError, match="--arch resnet34 does not match"):
        load_model(path, arch="resnet34")
    with pytest.raises(FnconvertError, match="classifier.6.weight"):
        load_model(path, arch="vgg11")


def test_not_a_model(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "t.pt")
    with pytest.raises(FnconvertError, match="holds a Tensor"):
        load_model(tmp_path / "t.pt")
    torch.save({"a": 1, "b": "text"}, tmp_path / "d.pt")
    with pytest.raises(FnconvertError, match="flat state_dict of tensors"):
        load_model(tmp_path / "d.pt", arch="resnet18")


def test_missing_empty_unknown_and_unreadable(tmp_path, monkeypatch):
    with pytest.raises(FnconvertError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(FnconvertError, match="does not exist or is not a file"):
        load_model(tmp_path)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(FnconvertError, match="is empty"):
        load_model(tmp_path / "empty.pt")
    (tmp_path / "text.pt").write_text("hello, I am not a model\n" * 10)
    with pytest.raises(FnconvertError, match="unknown format"):
        load_model(tmp_path / "text.pt")
    import zipfile

    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(FnconvertError, match="zip archive of unknown layout"):
        load_model(tmp_path / "other.zip")
    locked = tmp_path / "locked.pt"  # unreadable
    locked.write_bytes(b"\x80\x02")
    deny_reading(monkeypatch, locked)
    with pytest.raises(FnconvertError, match="cannot be read.*Permission denied.*permissions"):
        load_model(locked)


def test_non_finite_safetensors(tmp_path):
    from safetensors.torch import save_file

    sd = torchvision.models.resnet18(num_classes=3).state_dict()
    sd["fc.weight"][1, 2] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"))
    with pytest.raises(FnconvertError, match="'fc.weight' holds NaN"):
        load_model(tmp_path / "nan.safetensors", arch="resnet18")
