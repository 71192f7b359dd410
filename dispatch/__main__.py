"""python -m dispatch [--version] list | explain | check | selftest

  list [--markdown]          every registered backend: importable here?, its capability record
  explain FILE | FIELD=VALUE ...
                             every backend's verdict on each profile of FILE, or on one config
                             (e.g. num_heads=32 q_dtype=fp8 ...); exit 1 when one has no backend
  check FILE                 every problem in a config file, one per line; exit 1 when there is one
  selftest [--device D]      every backend available here against a float64 reference; exit 1 on a
                             failure or when nothing passed, 2 when the device is not there

Each takes --json for machine-readable output (an error, too, comes as JSON: {"ok": false, "error": ...}).
A user's mistake (a missing file, an unknown device, a bad config) is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Optional, Sequence

from dispatch import registry
from dispatch.capabilities import Capability, missing_modules, resolve_device
from dispatch.config import AttentionConfig


def capability_as_dict(capability: Capability) -> dict:
    return {
        "description": capability.description,
        "q_dtypes": sorted(capability.q_dtypes),
        "kv_cache_dtypes": sorted(capability.kv_cache_dtypes),
        "out_dtypes": sorted(capability.out_dtypes),
        "kv_quant_modes": sorted(m.value for m in capability.kv_quant_modes),
        "head_sizes": capability.head_size_rule(),
        "block_sizes": capability.block_size_rule(),
        "features": sorted(capability.features),
        "devices": sorted(capability.devices),
        "min_compute_capability": ".".join(map(str, capability.min_compute_capability or ())) or None,
        "min_compute_capability_by_dtype": {d: ".".join(map(str, cc))
                                            for d, cc in capability.min_compute_capability_by_dtype},
        "required_modules": list(capability.required_modules),
        "cuda_graph_safe": capability.cuda_graph_safe,
        "fp8_query_p_dtype": capability.fp8_query_p_dtype,
    }


def module_versions(modules) -> dict[str, str]:
    """Installed distribution and version behind each required module, from package metadata."""
    import importlib.metadata as metadata

    owners = metadata.packages_distributions()
    versions = {}
    for module in modules:
        dists = owners.get(module.split(".")[0], [])
        versions[module] = ", ".join(f"{d} {metadata.version(d)}" for d in dists) if dists else "not installed"
    return versions


def _list(args) -> int:
    if args.markdown:
        from dispatch.docs import support_table

        print(support_table())
        return 0
    rows = []
    for name in registry.backend_names():
        entry = registry.get_backend(name)
        if isinstance(entry, str):
            rows.append({"name": name, "importable": False, "problems": [entry], "capability": None})
            continue
        problems = list(missing_modules(entry.capability.required_modules))
        rows.append({"name": name, "importable": not problems, "problems": problems,
                     "versions": module_versions(entry.capability.required_modules),
                     "capability": capability_as_dict(entry.capability)})
    if args.json:
        print(json.dumps({"order": list(registry.default_order()), "backends": rows}, indent=2))
        return 0
    print(f"auto order: {', '.join(registry.default_order())}")
    for row in rows:
        versions = "; ".join(f"{m}: {v}" for m, v in row.get("versions", {}).items())
        print(f"\n{row['name']}: {'importable' if row['importable'] else 'NOT importable'}"
              + (f" ({versions})" if versions else ""))
        for problem in row["problems"]:
            print(f"  ! {problem}")
        for key, value in (row["capability"] or {}).items():
            print(f"  {key:<32} {value}")
    return 0


class UsageError(Exception):
    """The command line asks for something that is not there (exit 2, as for argparse's own errors)."""


def _device(name: Optional[str]) -> Optional[str]:
    """Check --device early, so an unknown name is a usage error rather than a failure deep inside."""
    if name is None:
        return None
    try:
        resolve_device(name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return name


def _parse_fields(pairs: Sequence[str]) -> dict:
    fields = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"explain: expected FIELD=VALUE after the first FIELD=VALUE, got {pair!r}")
        try:
            fields[key] = json.loads(value)
        except json.JSONDecodeError:
            fields[key] = value
    return fields


def _config_from_fields(pairs: Sequence[str]) -> AttentionConfig:
    from pydantic import ValidationError

    from dispatch.files import validation_problems

    try:
        return AttentionConfig(**_parse_fields(pairs))
    except ValidationError as exc:  # one line per field or rule, without pydantic's decoration
        raise ValueError("; ".join(f"{key_path}: {message}" for _, key_path, message in validation_problems(exc))
                         ) from None


def _configs_to_explain(args) -> dict[str, AttentionConfig]:
    """label -> config, from a file (all profiles, one profile, or one layer) or from FIELD=VALUE pairs."""
    from dispatch.files import load_file

    first = args.target[0]
    if "=" in first:
        if args.profile or args.layer is not None:
            raise UsageError("--profile and --layer need a config FILE as the first argument")
        return {"(command line)": _config_from_fields(args.target)}
    if len(args.target) > 1:
        raise UsageError(f"explain: expected one FILE, got {args.target}")
    loaded = load_file(first)
    if args.layer is not None:
        return {f"layer {args.layer}": loaded.config_for_layer(args.layer)}
    if args.profile:
        if args.profile not in loaded.profiles:
            raise ValueError(f"{first}: profile {args.profile!r} not found; profiles: {', '.join(loaded.profiles)}")
        return {args.profile: loaded.profiles[args.profile]}
    return dict(loaded.profiles)


def _explain(args) -> int:
    from dispatch.selector import explain

    device = _device(args.device)
    reports = {label: explain(config, device) for label, config in _configs_to_explain(args).items()}
    if args.json:
        print(json.dumps({label: r.to_dict() for label, r in reports.items()}, indent=2))
    else:
        print("\n\n".join(f"== {label} ==\n{report}" for label, report in reports.items()))
    return 0 if all(r.chosen for r in reports.values()) else 1


def _check(args) -> int:
    from dispatch.files import check_file, load_file

    problems = check_file(args.file)
    loaded = None if problems else load_file(args.file)
    if args.json:
        print(json.dumps({"file": args.file, "ok": not problems, "problems": problems,
                          "profiles": list(loaded.profiles) if loaded else []}, indent=2))
    elif problems:
        print("\n".join(problems))
    else:
        layers = f", layers {loaded.mapped_layers} mapped" if loaded.layer_ranges else ""
        layers += " + '*'" if loaded.other_layers else ""
        print(f"{args.file}: ok ({len(loaded.profiles)} profiles: {', '.join(loaded.profiles)}{layers})")
    return 1 if problems else 0


def _selftest(args) -> int:
    import torch

    from dispatch.selftest import exit_code, format_results, results_as_dicts, run_selftest

    device = _device(args.device) or ("cuda" if torch.cuda.is_available() else "cpu")
    requested = torch.device(device)
    if requested.type == "cuda":
        # Without this check a missing GPU would show as every backend refused, or a CUDA error mid-run.
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise UsageError(f"--device {device}: CUDA is not available here (torch {torch.__version__}, {build}); "
                             "use --device cpu")
        if requested.index is not None and requested.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif requested.type != "cpu":
        raise UsageError(f"--device {device}: the selftest runs on 'cpu' or 'cuda'")
    if requested.type == "cpu" and "triton" not in sys.modules:
        # On a CPU, Triton kernels run only in its interpreter, which must be chosen before triton is
        # imported; the selftest turns it on so the Triton backend is checked here too.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    results = run_selftest(device)
    code = exit_code(results)
    if args.json:
        print(json.dumps({"device": str(resolve_device(device)), "ok": code == 0,
                          "results": results_as_dicts(results)}, indent=2))
    else:
        print(format_results(results, str(resolve_device(device))))
    if not any(r.status == "pass" for r in results):
        print(f"error: no backend passed a single config on {device}: every one was refused or failed "
              "(see the reasons above), so this install is not checked", file=sys.stderr)
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    from dispatch import __version__

    parser = argparse.ArgumentParser(prog="python -m dispatch", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"attention-dispatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="registered backends and their capability records")
    p.add_argument("--json", action="store_true")
    p.add_argument("--markdown", action="store_true", help="the README's support table")
    p.set_defaults(run=_list)
    p = sub.add_parser("explain", help="every backend's verdict on each profile of a file, or on one config")
    p.add_argument("target", nargs="+", metavar="FILE | FIELD=VALUE")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--profile", default=None, help="only this profile of FILE")
    group.add_argument("--layer", type=int, default=None, help="only the profile that FILE's layer map gives layer I")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_explain)
    p = sub.add_parser("check", help="every problem in a config file: its profiles, layer map and backend names")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_check)
    p = sub.add_parser("selftest", help="every available backend against a float64 reference")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_selftest)
    args = parser.parse_args(argv)
    try:
        code = args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader went away (`... | head`): stop quietly, as a Unix tool ended by SIGPIPE does. Point
        # stdout at /dev/null so the interpreter's final flush does not raise again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except (UsageError, ValueError) as exc:  # a user's mistake: one clear line (or JSON), no traceback
        message = str(exc)
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "error": message}, indent=2))
        else:
            print(f"error: {message}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())
