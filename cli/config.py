"""``--config FILE.toml`` and ``--save-config``: every transform option is a key; command-line flags win."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import typer

from fnconvert.errors import FnconvertError

# Parameters that steer the config handling itself, or are not options of the conversion.
_NOT_KEYS = {"config", "save_config", "json_out", "model", "verbose"}


def apply_config(ctx: typer.Context, config: Path | None, save_config: Path | None) -> dict:
    """Merge the TOML file under the command-line values; return the effective option values."""
    params = dict(ctx.params)
    valid = sorted(k for k in params if k not in _NOT_KEYS)
    if config is not None:
        try:
            file_values = tomllib.loads(Path(config).read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise FnconvertError(f"--config {config} is not valid TOML ({e}); fix the syntax")
        file_values = {k.replace("-", "_"): v for k, v in file_values.items()}
        unknown = sorted(set(file_values) - set(valid))
        if unknown:
            raise FnconvertError(
                f"--config {config}: unknown key(s) {', '.join(unknown)}; valid keys are {', '.join(valid)}"
            )
        for key, value in file_values.items():
            src = ctx.get_parameter_source(key)  # Typer vendors click: compare by name
            if src is None or src.name in ("DEFAULT", "DEFAULT_MAP"):
                params[key] = value
    effective = {k: params[k] for k in valid}
    if save_config is not None:
        _write_toml(effective, Path(save_config))
    return effective


def _write_toml(values: dict, path: Path) -> None:
    lines = ["# fnconvert transform configuration (written by --save-config)"]
    for k, v in values.items():
        if v is None:
            continue
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            lines.append(f"{k} = {v!r}")
        else:
            lines.append(f"{k} = {_quote(str(v))}")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
