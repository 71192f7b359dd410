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
  3. the environment variable DISPATCH_BACKEND (read once, when dispatch is imported);
  4. the file (top level, then the profile);
  5. the default, "auto".
Scope and environment are folded into the config here, when it is built. A
config whose backend is "auto" (one built in code, say) is steered the same
way at selection (see `dispatch.overrides`). DISPATCH_CONFIG names the file
`load_config()` reads when it is given no path.

Every problem in a file is reported in one go (`ConfigFileError.problems`,
one line each: ``PATH: KEY.PATH: what is wrong``), and `check_file()` also
checks the file's backend names against the registry. Layer maps are kept as
ranges, so ``"0-1000000000"`` costs no more than ``"0-3"``.
"""

from __future__ import annotations

import bisect
import difflib
import functools
import json
import os
import pathlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from pydantic import ValidationError

from dispatch import registry
from dispatch.config import AttentionConfig, ConfigRuleError
from dispatch.overrides import ENVIRONMENT_VARIABLE, check_backend_name, current_override

__all__ = [
    "ConfigFileError",
    "LoadedFile",
    "load_file",
    "check_file",
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


class ConfigFileError(ValueError):
    """Everything wrong with one config file: ``problems`` holds one line per problem, each
    starting with the file's path; the message is those lines."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def resolve_backend(call_argument: Optional[str], file_value: Optional[str]) -> str:
    """The documented precedence: call argument > use() scope > DISPATCH_BACKEND > file > 'auto'.

    A name taken from DISPATCH_BACKEND must be registered (the error names the variable).
    """
    override = current_override()
    if call_argument is None and override.backend is not None:
        if override.backend_source == ENVIRONMENT_VARIABLE:
            check_backend_name(override.backend, ENVIRONMENT_VARIABLE)
        return override.backend
    for candidate in (call_argument, file_value):
        if candidate is not None:
            return candidate
    return "auto"


# ---- reading files -------------------------------------------------------------------


class _Table(dict):
    """A mapping as parsed (last value wins), remembering the keys that appeared more than once."""

    duplicates: list[tuple[str, str]]  # (key, where, e.g. "line 4; first on line 1")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.duplicates = []


def _json_table(pairs: list[tuple[str, Any]]) -> _Table:
    table = _Table()
    for key, value in pairs:
        if key in table:
            table.duplicates.append((key, ""))
        table[key] = value
    return table


def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """safe_load, except that a mapping records its repeated keys instead of silently keeping the last."""

        def construct_table(self, node):
            table = _Table()
            yield table
            table.update(self.construct_mapping(node))
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if isinstance(key, (str, int, float, bool)) and key in first_line:
                    table.duplicates.append((str(key), f"line {line}; first on line {first_line[key]}"))
                first_line.setdefault(key, line)

    Loader.add_constructor("tag:yaml.org,2002:map", Loader.construct_table)
    return Loader


def _duplicate_problems(path: pathlib.Path, table: Any, prefix: str = "") -> list[str]:
    if not isinstance(table, dict):
        return []
    problems = [f"{path}: {prefix}{key}: duplicate key {key!r}" + (f" ({where})" if where else "")
                for key, where in getattr(table, "duplicates", ())]
    for key, value in table.items():
        problems += _duplicate_problems(path, value, f"{prefix}{key}.")
    return problems


def _text(path: pathlib.Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigFileError([f"{path}: cannot read the file: {exc.strerror or exc}"]) from None
    try:
        return raw.decode("utf-8-sig")  # a leading byte order mark is allowed and dropped
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigFileError([
            f"{path}: not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset {exc.start} (line {line}): "
            f"{exc.reason}; config files are read as UTF-8, so save it in that encoding"
        ]) from None


def _read(path: pathlib.Path) -> tuple[dict, list[str]]:
    """(the parsed top-level table, one problem per repeated key). Raises ConfigFileError when
    the file cannot be parsed at all."""
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigFileError([f"{path}: unknown config file type {suffix!r}; expected .toml, .yaml, .yml or .json"])
    text = _text(path)
    if suffix == ".toml":
        import tomllib  # TOML itself refuses a repeated key

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigFileError([f"{path}: not valid TOML: {exc}"]) from None
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigFileError([
                f"{path}: reading YAML needs pyyaml, which is not installed; "
                "install it with: pip install 'attention-dispatch[yaml]' (or pip install pyyaml)"
            ]) from None
        try:
            data = yaml.load(text, Loader=_yaml_loader())
        except yaml.YAMLError as exc:
            raise ConfigFileError([f"{path}: not valid YAML: {exc}"]) from None
    else:
        try:
            data = json.loads(text, object_pairs_hook=_json_table)
        except json.JSONDecodeError as exc:
            raise ConfigFileError([f"{path}: not valid JSON: {exc}"]) from None
    if not isinstance(data, dict):
        raise ConfigFileError([
            f"{path}: expected a table of config fields at the top level, got {type(data).__name__}"
        ])
    return data, _duplicate_problems(path, data)


def _unknown_key(path: pathlib.Path, key_path: str, key: str, valid: Sequence[str], what: str = "key") -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid {what}s: {', '.join(valid)}"
    return f"{path}: {key_path}: unknown {what} {key!r}{hint}"


def _known_fields(path: pathlib.Path, prefix: str, table: Mapping[str, Any], problems: list[str],
                  extra_valid: Sequence[str] = ()) -> dict:
    """The table without its unknown keys; each unknown key is a problem (with the closest valid key)."""
    valid = list(_FIELDS) + list(extra_valid)
    known = {}
    for key, value in table.items():
        if key in valid:
            known[key] = value
        else:
            problems.append(_unknown_key(path, f"{prefix}{key}", str(key), valid))
    return known


# (field path inside the config or "" for a cross-field rule, the problem's text): how a problem
# inherited from the top level is recognized in a profile, so it is reported once.
_Problem = tuple[str, str, str]  # (field, key path, message)


def validation_problems(exc: ValidationError, prefix: str = "") -> list[_Problem]:
    """Each problem in an AttentionConfig ValidationError as (field, key path, message): one per
    field, and one per broken cross-field rule (key path `prefix` without its dot, or '(top level)')."""
    found = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"])
        key_path = f"{prefix}{where}" if where else prefix.rstrip(".") or "(top level)"
        cause = (error.get("ctx") or {}).get("error")
        messages = cause.problems if isinstance(cause, ConfigRuleError) else [
            error["msg"].removeprefix("Value error, ")]
        found.extend((where, key_path, message) for message in messages)
    return found


def _build(prefix: str, fields: dict) -> tuple[Optional[AttentionConfig], list[_Problem]]:
    try:
        return AttentionConfig(**fields), []
    except ValidationError as exc:
        return None, validation_problems(exc, prefix)


_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def _parse_layer_key(key: str) -> tuple[list[tuple[int, int]], Optional[str]]:
    """('0-3,5' -> [(0, 3), (5, 5)], None) or ([], the problem)."""
    ranges = []
    for part in str(key).split(","):
        match = _RANGE.match(part)
        if not match:
            return [], f"expected layer indices or ranges such as '0-3', '4,6,8' or '*', got {key!r}"
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            return [], f"range {part.strip()!r} ends before it starts"
        ranges.append((first, last))
    return ranges, None


def _spans(ranges: Sequence[tuple[int, int]]) -> str:
    return ",".join(f"{a}-{b}" if b != a else f"{a}" for a, b in ranges)


@dataclass(frozen=True)
class LoadedFile:
    """A parsed config file: every profile as a config, and the layer map (if any)."""

    path: pathlib.Path
    profiles: Mapping[str, AttentionConfig]  # includes DEFAULT_PROFILE
    # The layer map as disjoint (first, last, profile) ranges, sorted: memory per range, not per layer.
    layer_ranges: tuple[tuple[int, int, str], ...]
    other_layers: Optional[str]  # the profile of '*', if given

    @functools.cached_property
    def _layer_starts(self) -> list[int]:
        return [first for first, _, _ in self.layer_ranges]

    @property
    def mapped_layers(self) -> int:
        """How many layers the explicit ranges name."""
        return sum(last - first + 1 for first, last, _ in self.layer_ranges)

    def config_for_layer(self, layer: int) -> AttentionConfig:
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"layer: expected a non-negative layer index, got {layer!r}")
        if not self.layer_ranges and self.other_layers is None:
            return self.profiles[DEFAULT_PROFILE]
        i = bisect.bisect_right(self._layer_starts, layer) - 1
        name = self.layer_ranges[i][2] if i >= 0 and layer <= self.layer_ranges[i][1] else self.other_layers
        if name is None:
            covered = f"0-{self.layer_ranges[-1][1]}" if self.layer_ranges else "none"
            raise ValueError(f"{self.path}: layers: layer {layer} is not mapped (covered: {covered}, and no '*')")
        return self.profiles[name]


def _layer_map(path: pathlib.Path, raw_layers: Any, declared: Sequence[str],
               problems: list[str]) -> tuple[tuple[tuple[int, int, str], ...], Optional[str]]:
    if not isinstance(raw_layers, dict):
        problems.append(f"{path}: layers: expected a table mapping layer ranges to profile names")
        return (), None
    taken: list[tuple[int, int, str]] = []
    other_layers = None
    for key, name in raw_layers.items():
        if not isinstance(name, str) or name not in declared:
            problems.append(_unknown_key(path, f"layers.{key}", str(name), list(declared), what="profile"))
            continue
        if str(key).strip() == "*":
            other_layers = name
            continue
        ranges, problem = _parse_layer_key(key)
        if problem:
            problems.append(f"{path}: layers.{key}: {problem}")
            continue
        for a, b in ranges:  # against earlier keys and earlier parts of this key ("0-3,2-5")
            # `taken` stays sorted and disjoint, so only the neighbours of a's place can overlap [a, b].
            i = bisect.bisect_left(taken, (a,))
            clash = next(((max(a, first), owner) for first, last, owner in taken[max(i - 1, 0):i + 1]
                          if a <= last and first <= b), None)
            if clash is not None:
                problems.append(f"{path}: layers.{key}: layer {clash[0]} is already mapped to {clash[1]!r} "
                                "(ranges overlap)")
                break
            taken.insert(i, (a, b, name))
    if taken and other_layers is None:
        gaps, expected = [], 0
        for first, last, _ in taken:
            if first > expected:
                gaps.append((expected, first - 1))
            expected = last + 1
        if gaps:
            one = len(gaps) == 1 and gaps[0][0] == gaps[0][1]
            problems.append(f"{path}: layers: layer{'' if one else 's'} {_spans(gaps)} "
                            f"{'is' if one else 'are'} not mapped; map {'it' if one else 'them'} "
                            "or add '*' for the rest")
    return tuple(taken), other_layers


def _load(path: Optional[PathLike], resolve: Callable[[Optional[str]], str],
          problems: list[str]) -> Optional[LoadedFile]:
    """Parse and validate a whole file, appending every problem found to `problems` (a problem
    that stops parsing raises ConfigFileError). Returns None when any problem was found."""
    if path is None:
        path = os.environ.get("DISPATCH_CONFIG")
        if not path:
            raise ConfigFileError(["path: no config file given and DISPATCH_CONFIG is not set"])
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigFileError([f"{path}: no such config file" if not path.exists() else f"{path}: not a file"])
    data, duplicates = _read(path)
    problems.extend(duplicates)
    defaults = _known_fields(path, "", {k: v for k, v in data.items() if k not in _TOP_LEVEL_TABLES}, problems)

    raw_profiles = data.get("profiles", {})
    if not isinstance(raw_profiles, dict):
        problems.append(f"{path}: profiles: expected a table of named profiles, got {type(raw_profiles).__name__}")
        raw_profiles = {}
    declared = [DEFAULT_PROFILE]
    profiles: dict[str, AttentionConfig] = {}
    config, inherited = _build("", {**defaults, "backend": resolve(defaults.get("backend"))})
    problems.extend(f"{path}: {key_path}: {message}" for _, key_path, message in inherited)
    if config is not None:
        profiles[DEFAULT_PROFILE] = config
    known = {(field, message) for field, _, message in inherited}
    for name, overrides in raw_profiles.items():
        if name == DEFAULT_PROFILE:
            problems.append(f"{path}: profiles.{DEFAULT_PROFILE}: reserved for the top-level fields; use another name")
            continue
        if not isinstance(overrides, dict):
            problems.append(f"{path}: profiles.{name}: expected a table of config fields, got {overrides!r}")
            continue
        declared.append(name)
        fields = {**defaults, **_known_fields(path, f"profiles.{name}.", overrides, problems)}
        config, found = _build(f"profiles.{name}.", {**fields, "backend": resolve(fields.get("backend"))})
        # A problem the profile inherits from the top level was reported there already.
        problems.extend(f"{path}: {key_path}: {message}" for field, key_path, message in found
                        if (field, message) not in known)
        if config is not None:
            profiles[name] = config

    layer_ranges, other_layers = _layer_map(path, data.get("layers", {}), declared, problems)
    return None if problems else LoadedFile(path, profiles, layer_ranges, other_layers)


def load_file(path: Optional[PathLike] = None, *, backend: Optional[str] = None) -> LoadedFile:
    """Parse and validate a whole file: every profile and the layer map.

    Raises ConfigFileError (a ValueError) listing every problem, one per line.
    """
    problems: list[str] = []
    loaded = _load(path, lambda file_value: resolve_backend(backend, file_value), problems)
    if loaded is None:
        raise ConfigFileError(problems)
    return loaded


def check_file(path: PathLike) -> list[str]:
    """Every problem in the file as written, one line each (empty when it is fine): what `load_file`
    reports, plus backend names the registry does not know. Neither `use()` nor DISPATCH_BACKEND
    applies here: the file's own values are checked."""
    problems: list[str] = []
    try:
        _load(path, lambda file_value: file_value if file_value is not None else "auto", problems)
    except ConfigFileError as exc:
        return problems + exc.problems
    path = pathlib.Path(path)
    data, _ = _read(path)
    tables = [("", data)]
    if isinstance(data.get("profiles"), dict):
        tables += [(f"profiles.{name}.", table) for name, table in data["profiles"].items() if isinstance(table, dict)]
    names = ["auto", *registry.backend_names()]
    for prefix, table in tables:
        value = table.get("backend")
        if isinstance(value, str) and value.strip() and value.strip().lower() not in names:
            problems.append(_unknown_key(path, f"{prefix}backend", value, names, what="backend"))
    return problems


def load_profiles(path: Optional[PathLike] = None, *, backend: Optional[str] = None) -> dict[str, AttentionConfig]:
    """Every profile in the file ('default' is the top-level fields) as an AttentionConfig."""
    return dict(load_file(path, backend=backend).profiles)


def load_config(path: Optional[PathLike] = None, profile: Optional[str] = None, *,
                backend: Optional[str] = None) -> AttentionConfig:
    """The file's top-level config, or one named profile merged over it."""
    loaded = load_file(path, backend=backend)
    name = profile or DEFAULT_PROFILE
    if name not in loaded.profiles:
        raise ConfigFileError([_unknown_key(loaded.path, f"profiles.{name}", name, list(loaded.profiles),
                                            what="profile")])
    return loaded.profiles[name]


def config_for_layer(path_or_loaded: Union[PathLike, LoadedFile], layer: int) -> AttentionConfig:
    """The config of transformer layer `layer` under the file's ``layers`` map."""
    loaded = path_or_loaded if isinstance(path_or_loaded, LoadedFile) else load_file(path_or_loaded)
    return loaded.config_for_layer(layer)
