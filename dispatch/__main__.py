"""python -m dispatch list | explain | selftest

  list [--markdown]          every registered backend: importable here?, its capability record
  explain FIELD=VALUE ...    every backend's verdict on one config (e.g. num_heads=32 q_dtype=fp8 ...)
  selftest [--device D]      every backend available here against a float64 reference; exit 1 on a failure

Each takes --json for machine-readable output.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
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


def _parse_fields(pairs: Sequence[str]) -> dict:
    fields = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"explain: expected FIELD=VALUE, got {pair!r}")
        try:
            fields[key] = json.loads(value)
        except json.JSONDecodeError:
            fields[key] = value
    return fields


def _configs_to_explain(args) -> dict[str, AttentionConfig]:
    """label -> config, from a file (all profiles, one profile, or one layer) or from FIELD=VALUE pairs."""
    from dispatch.files import load_file

    first = args.target[0]
    if "=" in first or not pathlib.Path(first).exists():
        if args.profile or args.layer is not None:
            raise ValueError("--profile and --layer need a config FILE as the first argument")
        return {"(command line)": AttentionConfig(**_parse_fields(args.target))}
    if len(args.target) > 1:
        raise ValueError(f"explain: expected one FILE, got {args.target}")
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

    reports = {label: explain(config, args.device) for label, config in _configs_to_explain(args).items()}
    if args.json:
        print(json.dumps({label: r.to_dict() for label, r in reports.items()}, indent=2))
    else:
        print("\n\n".join(f"== {label} ==\n{report}" for label, report in reports.items()))
    return 0 if all(r.chosen for r in reports.values()) else 1


def _check(args) -> int:
    from dispatch.files import load_file

    problems = []
    try:
        loaded = load_file(args.file)
    except ValueError as exc:
        problems.append(str(exc))
    if args.json:
        print(json.dumps({"file": args.file, "ok": not problems, "problems": problems,
                          "profiles": [] if problems else list(loaded.profiles)}, indent=2))
    elif problems:
        print("\n".join(problems))
    else:
        layers = f", layers {len(loaded.layer_profiles)} mapped" if loaded.layer_profiles else ""
        layers += " + '*'" if loaded.other_layers else ""
        print(f"{args.file}: ok ({len(loaded.profiles)} profiles: {', '.join(loaded.profiles)}{layers})")
    return 1 if problems else 0


def _selftest(args) -> int:
    from dispatch.selftest import format_results, results_as_dicts, run_selftest

    device = args.device or ("cuda" if resolve_device(None).type == "cuda" else "cpu")
    if device == "cpu" and "triton" not in sys.modules:
        # On a CPU, Triton kernels run only in its interpreter, which must be chosen before triton is
        # imported; the selftest turns it on so the Triton backend is checked here too.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    results = run_selftest(device)
    if args.json:
        print(json.dumps({"device": str(resolve_device(device)), "results": results_as_dicts(results)}, indent=2))
    else:
        print(format_results(results, str(resolve_device(device))))
    return 1 if any(r.status == "fail" for r in results) else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dispatch", description=__doc__.splitlines()[0])
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
    p = sub.add_parser("check", help="validate every profile and the layer map of a config file")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_check)
    p = sub.add_parser("selftest", help="every available backend against a float64 reference")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_selftest)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as exc:  # a bad file or config: one clear line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
