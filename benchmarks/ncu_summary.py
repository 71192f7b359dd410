"""python -m benchmarks.ncu_summary PROFILE-sass.csv [--top 25]

Summarizes the per-instruction source page of an Nsight Compute report
(`ncu --import R.ncu-rep --page source --print-source sass --csv`, written by
`scripts/gpu-checks.sh profile`): where the kernel's warps wait. Prints the
share of warp-stall samples per stall reason, per opcode (the first word of the
instruction, predicates dropped) and the top instructions, each with how many
times it executed. Needs no GPU: it reads the CSV only.
"""

from __future__ import annotations

import argparse
import collections
import csv
import re
import sys


def load(path: str) -> list[dict]:
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('"Address"'))
    return list(csv.DictReader(lines[start:]))


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except (ValueError, AttributeError):
        return 0.0


def opcode(source: str) -> str:
    words = re.sub(r"^@!?U?P\w+\s+", "", source.strip()).split()
    return words[0] if words else "?"


def stalls(row: dict) -> dict[str, float]:
    """Warp samples per stall reason of one instruction (all samples; the '(Not Issued)' columns
    are a subset of them)."""
    return {key[len("stall_"):]: _number(value) for key, value in row.items()
            if key and key.startswith("stall_") and not key.endswith("(Not Issued)")}


def summarize(rows: list[dict], top: int) -> str:
    samples = sum(_number(r["Warp Stall Sampling (All Samples)"]) for r in rows) or 1.0
    reasons = collections.Counter()
    by_opcode = collections.Counter()
    executed = collections.Counter()
    for r in rows:
        reasons.update(stalls(r))
        op = opcode(r["Source"])
        by_opcode[op] += _number(r["Warp Stall Sampling (All Samples)"])
        executed[op] += _number(r["Instructions Executed"])
    out = [f"{len(rows)} instructions, {int(samples)} warp samples, {int(sum(executed.values()))} warp instructions "
           "executed", "", "| stall reason | share of samples |", "|---|---|"]
    out += [f"| {name} | {count / samples:.1%} |" for name, count in reasons.most_common() if count / samples >= 0.005]
    out += ["", "| opcode | share of samples | executed (warp instructions) |", "|---|---|---|"]
    out += [f"| {op} | {count / samples:.1%} | {int(executed[op])} |" for op, count in by_opcode.most_common(top)]
    out += ["", "| address | instruction | share | top reasons |", "|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -_number(r["Warp Stall Sampling (All Samples)"]))[:top]:
        share = _number(r["Warp Stall Sampling (All Samples)"]) / samples
        worst = sorted(stalls(r).items(), key=lambda kv: -kv[1])
        stalls_text = ", ".join(f"{k} {v / samples:.1%}" for k, v in worst[:3] if v)
        out.append(f"| {r['Address'][-5:]} | `{r['Source'].strip()[:60]}` | {share:.1%} | {stalls_text} |")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ncu_summary", description=__doc__.splitlines()[0])
    parser.add_argument("csv")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    print(summarize(load(args.csv), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
