"""python -m dispatch list | explain | selftest

  list [--markdown]          every registered backend: importable here?, its capability record
  explain FIELD=VALUE ...    every backend's verdict on one config (e.g. num_heads=32 q_dtype=fp8 ...)
  selftest [--device D]      every backend available here against a float64 reference; exit 1 on a failure

Each takes --json for machine-readable output.
"""

from __future__ import annotations

import argparse
import json
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
                     "capability": capability_as_dict(entry.capability)})
    if args.json:
        print(json.dumps({"order": list(registry.default_order()), "backends": rows}, indent=2))
        return 0
    print(f"auto order: {', '.join(registry.default_order())}")
    for row in rows:
        print(f"\n{row['name']}: {'importable' if row['importable'] else 'NOT importable'}")
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


def _explain(args) -> int:
    from dispatch.selector import explain

    config = AttentionConfig(**_parse_fields(args.fields))
    report = explain(config, args.device)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0 if report.chosen else 1


def _selftest(args) -> int:
    from dispatch.selftest import format_results, results_as_dicts, run_selftest

    device = args.device or ("cuda" if resolve_device(None).type == "cuda" else "cpu")
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
    p = sub.add_parser("explain", help="every backend's verdict on one config")
    p.add_argument("fields", nargs="+", metavar="FIELD=VALUE")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_explain)
    p = sub.add_parser("selftest", help="every available backend against a float64 reference")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_selftest)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
