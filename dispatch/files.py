"""Attention configs from files (TOML, YAML, JSON), named profiles, per-layer maps, overrides.

A file's top-level keys are `AttentionConfig` fields: the defaults. A table
``profiles`` holds named overrides, and an optional table ``layers`` maps
layer indices or ranges to profile names::

    num_heads = 32
    num_kv_heads = 8
    head_size = 128
    q_dtype = "bf16"

    [profiles.sliding]
    sliding_window = 4096

    [layers]
    "0-3" = "sliding"
    "4,6,8" = "default"
    "*" = "default"        # every layer not named above

Where the backend comes from, highest first (one rule, `resolve_backend`):
  1. the call argument (`load_config(..., backend="sdpa")`);
  2. a `with dispatch.use(backend=...)` scope around the load;
  3. the environment variable DISPATCH_BACKEND;
  4. the file (top level, then the profile);
  5. the default, "auto".
Environment and scope are folded into the config here, when it is built, so
selection itself reads no hidden state. A config whose backend is "auto" is
also steered at call time by `use(backend=..., order=[...])` (see
`dispatch.selector`). DISPATCH_CONFIG names the file `load_config()` reads
when it is given no path.
"""

from __future__ import annotations

import difflib
import json
import os
import pathlib
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

from pydantic import ValidationError

from dispatch.config import AttentionConfig
from dispatch.overrides import current_override

__all__ = [
    "LoadedFile",
    "load_file",
    "load_config",
    "load_profiles",
    "config_for_layer",
    "resolve_backend",
    "DEFAULT_PROFILE",
]

DEFAULT_PROFILE = "default"
_FIELDS = tuple(AttentionConfig.model_fields)
_TOP_LEVEL_TABLES = ("profiles", "layers")
PathLike = Union[str, os.PathLike]


def resolve_backend(call_argument: Optional[str], file_value: Optional[str]) -> str:
    """The documented precedence: call argument > use() scope > DISPATCH_BACKEND > file > 'auto'."""
    for candidate in (call_argument, current_override().backend, os.environ.get("DISPATCH_BACKEND") or None, file_value):
        if candidate is not None:
            return candidate
    return "auto"


# ---- reading files -------------------------------------------------------------------


def _read(path: pathlib.Path) -> dict:
    suffix = path.suffix.lower()
    text = path.read_text()
    if suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML: {exc}") from None
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(
                f"{path}: reading YAML needs pyyaml, which is not installed; "
                "install it with: pip install 'attention-dispatch[yaml]' (or pip install pyyaml)"
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
    else:
        raise ValueError(f"{path}: unknown config file type {suffix!r}; expected .toml, .yaml, .yml or .json")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of config fields at the top level, got {type(data).__name__}")
    return data


def _unknown_key(path: pathlib.Path, key_path: str, key: str, valid: Sequence[str], what: str = "key") -> ValueError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid {what}s: {', '.join(valid)}"
    return ValueError(f"{path}: {key_path}: unknown {what} {key!r}{hint}")


def _check_fields(path: pathlib.Path, prefix: str, table: Mapping[str, Any], extra_valid: Sequence[str] = ()) -> None:
    for key in table:
        if key not in _FIELDS and key not in extra_valid:
            raise _unknown_key(path, f"{prefix}{key}", key, list(_FIELDS) + list(extra_valid))


def _build(path: pathlib.Path, prefix: str, fields: dict, backend: Optional[str]) -> AttentionConfig:
    fields = dict(fields)
    fields["backend"] = resolve_backend(backend, fields.get("backend"))
    try:
        return AttentionConfig(**fields)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"])
            key_path = f"{prefix}{where}" if where else prefix.rstrip(".") or "(top level)"
            problems.append(f"{key_path}: {error['msg'].removeprefix('Value error, ')}")
        raise ValueError(f"{path}: " + "; ".join(problems)) from None


_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def _parse_layer_key(path: pathlib.Path, key: str) -> list[int]:
    indices: list[int] = []
    for part in str(key).split(","):
        match = _RANGE.match(part)
        if not match:
            raise ValueError(
                f"{path}: layers.{key}: expected layer indices or ranges such as '0-3', '4,6,8' or '*', got {key!r}"
            )
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            raise ValueError(f"{path}: layers.{key}: range {part.strip()!r} ends before it starts")
        indices.extend(range(first, last + 1))
    return indices


@dataclass(frozen=True)
class LoadedFile:
    """A parsed config file: every profile as a config, and the layer map (if any)."""

    path: pathlib.Path
    profiles: Mapping[str, AttentionConfig]  # includes DEFAULT_PROFILE
    layer_profiles: Mapping[int, str]  # explicit layer index -> profile name
    other_layers: Optional[str]  # the profile of '*', if given

    def config_for_layer(self, layer: int) -> AttentionConfig:
        if not isinstance(layer, int) or layer < 0:
            raise ValueError(f"layer: expected a non-negative layer index, got {layer!r}")
        if not self.layer_profiles and self.other_layers is None:
            return self.profiles[DEFAULT_PROFILE]
        name = self.layer_profiles.get(layer, self.other_layers)
        if name is None:
            covered = f"0-{max(self.layer_profiles)}" if self.layer_profiles else "none"
            raise ValueError(f"{self.path}: layers: layer {layer} is not mapped (covered: {covered}, and no '*')")
        return self.profiles[name]


def load_file(path: Optional[PathLike] = None, *, backend: Optional[str] = None) -> LoadedFile:
    """Parse and validate a whole file: every profile and the layer map."""
    if path is None:
        path = os.environ.get("DISPATCH_CONFIG")
        if not path:
            raise ValueError("path: no config file given and DISPATCH_CONFIG is not set")
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such config file")
    data = _read(path)
    _check_fields(path, "", data, _TOP_LEVEL_TABLES)
    defaults = {k: v for k, v in data.items() if k not in _TOP_LEVEL_TABLES}

    raw_profiles = data.get("profiles", {})
    if not isinstance(raw_profiles, dict):
        raise ValueError(f"{path}: profiles: expected a table of named profiles, got {type(raw_profiles).__name__}")
    if DEFAULT_PROFILE in raw_profiles:
        raise ValueError(f"{path}: profiles.{DEFAULT_PROFILE}: reserved for the top-level fields; use another name")
    profiles = {DEFAULT_PROFILE: _build(path, "", defaults, backend)}
    for name, overrides in raw_profiles.items():
        if not isinstance(overrides, dict):
            raise ValueError(f"{path}: profiles.{name}: expected a table of config fields, got {overrides!r}")
        _check_fields(path, f"profiles.{name}.", overrides)
        profiles[name] = _build(path, f"profiles.{name}.", {**defaults, **overrides}, backend)

    layer_profiles: dict[int, str] = {}
    other_layers = None
    raw_layers = data.get("layers", {})
    if not isinstance(raw_layers, dict):
        raise ValueError(f"{path}: layers: expected a table mapping layer ranges to profile names")
    for key, name in raw_layers.items():
        if name not in profiles:
            raise _unknown_key(path, f"layers.{key}", str(name), list(profiles), what="profile")
        if str(key).strip() == "*":
            other_layers = name
            continue
        for index in _parse_layer_key(path, key):
            if index in layer_profiles:
                raise ValueError(
                    f"{path}: layers.{key}: layer {index} is already mapped to {layer_profiles[index]!r} "
                    "(ranges overlap)"
                )
            layer_profiles[index] = name
    if layer_profiles and other_layers is None:
        missing = sorted(set(range(max(layer_profiles) + 1)) - set(layer_profiles))
        if missing:
            raise ValueError(
                f"{path}: layers: layers {_compact(missing)} are not mapped; map them or add '*' for the rest"
            )
    return LoadedFile(path, profiles, layer_profiles, other_layers)


def _compact(indices: list[int]) -> str:
    runs, start = [], indices[0]
    for prev, cur in zip(indices, indices[1:] + [None]):
        if cur != prev + 1:
            runs.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = cur
    return ",".join(runs)


def load_profiles(path: Optional[PathLike] = None, *, backend: Optional[str] = None) -> dict[str, AttentionConfig]:
    """Every profile in the file ('default' is the top-level fields) as an AttentionConfig."""
    return dict(load_file(path, backend=backend).profiles)


def load_config(path: Optional[PathLike] = None, profile: Optional[str] = None, *,
                backend: Optional[str] = None) -> AttentionConfig:
    """The file's top-level config, or one named profile merged over it."""
    loaded = load_file(path, backend=backend)
    name = profile or DEFAULT_PROFILE
    if name not in loaded.profiles:
        raise _unknown_key(loaded.path, f"profiles.{name}", name, list(loaded.profiles), what="profile")
    return loaded.profiles[name]


def config_for_layer(path_or_loaded: Union[PathLike, LoadedFile], layer: int) -> AttentionConfig:
    """The config of transformer layer `layer` under the file's ``layers`` map."""
    loaded = path_or_loaded if isinstance(path_or_loaded, LoadedFile) else load_file(path_or_loaded)
    return loaded.config_for_layer(layer)
