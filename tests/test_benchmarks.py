"""The benchmark script runs end to end on the CPU (--smoke) and refuses to time without CUDA."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(*args):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "benchmarks.attention", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_without_cuda_it_says_so():
    result = run("--quick")
    assert result.returncode == 2
    assert "needs a CUDA device" in result.stdout


def test_smoke_run_checks_outputs_and_writes_results(tmp_path):
    result = run("--smoke", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "results.json").read_text())
    statuses = {(r["case"], r["dtypes"], r["backend"]): r["status"] for r in data["results"]}
    assert statuses[("smoke-decode", "fp16", "triton")] == "ok"
    assert statuses[("smoke-decode", "fp16", "sdpa")] == "ok"
    triton = next(r for r in data["results"] if r["backend"] == "triton" and r["status"] == "ok")
    assert triton["max_abs_diff_vs_sdpa"] is not None and triton["extra"]["rel_diff_vs_sdpa"] < 0.01
    assert (tmp_path / "results.csv").exists() and (tmp_path / "summary.md").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        # The int8 cache converts through the byte-permute PTX (no I2F) and the fp8 one through packed
        # F2FP (no F2F): the decode speed of quantized caches depends on both (benchmarks/RESULTS.md).
        (["--kv", "int8", "--mode", "int8_per_token_head"], ["I2F=0", "F2F=0"]),
        (["--kv", "fp8", "--mode", "fp8_per_tensor"], ["F2F=0"]),
    ],
    ids=["int8_per_token_head", "fp8_per_tensor"],
)
def test_sass_report_compiles_the_gpu_kernel_here(args, expected):
    """The kernel's GPU path (inline PTX included) compiles for sm_90 with the CPU machine's toolchain,
    and the instruction mix keeps the conversions the tuning relies on."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "benchmarks.sass_report", *args], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "HMMA=" in result.stdout
    for fragment in expected:
        assert fragment in result.stdout, result.stdout


NCU_SOURCE_PAGE = '''"Kernel Name","unified_attention_kernel",
"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)","Instructions Executed","stall_barrier","stall_long_sb","stall_math","stall_barrier (Not Issued)"
"0x7f0000000000","      BAR.SYNC.DEFER_BLOCKING 0x0","60","60","100","5","55","0","5"
"0x7f0000000010","  @!P0 LDS.U8 R3, [R14+UR9+0x6000]","30","20","4,000","0","30","0","0"
"0x7f0000000020","      HMMA.16816.F32 R84, R8, R84, RZ","10","5","800","0","0","10","0"
'''


def test_ncu_summary_reads_the_source_page(tmp_path):
    """The profile summary parses Nsight Compute's per-instruction CSV: shares of warp samples by
    stall reason (the '(Not Issued)' columns are not counted twice), by opcode (predicates dropped),
    and the top instructions."""
    from benchmarks import ncu_summary

    path = tmp_path / "profile-sass.csv"
    path.write_text(NCU_SOURCE_PAGE)
    text = ncu_summary.summarize(ncu_summary.load(str(path)), top=2)
    assert "3 instructions, 100 warp samples, 4900 warp instructions executed" in text
    assert "| long_sb | 85.0% |" in text and "| barrier | 5.0% |" in text and "| math | 10.0% |" in text
    assert "| LDS.U8 | 30.0% | 4000 |" in text
    assert "`BAR.SYNC.DEFER_BLOCKING 0x0` | 60.0% | long_sb 55.0%, barrier 5.0% |" in text
    assert "HMMA" not in text.split("| address |")[1]  # only the top 2 instructions are listed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
@pytest.mark.parametrize("module", ["benchmarks.profile_case", "benchmarks.tune_tiles", "benchmarks.ab_kernel"])
def test_gpu_only_tools_say_they_need_cuda(module):
    args = {"benchmarks.profile_case": ["decode-64x8k", "bf16"],
            "benchmarks.ab_kernel": ["--other", "backends/triton/kernel.py"]}.get(module, [])
    result = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 2 and "needs a CUDA device" in result.stdout, result.stdout + result.stderr


def test_ab_kernel_loads_another_kernel_file_and_reports_per_round_ratios(tmp_path):
    from benchmarks import ab_kernel

    other = tmp_path / "kernel_other.py"
    other.write_text((ROOT / "backends" / "triton" / "kernel.py").read_text())
    module = ab_kernel.load_kernel_module(str(other))
    assert module.unified_attention_kernel.fn.__code__.co_filename == str(other)

    # Round 2 ran slower for everyone: the ratios within a round stay 0.5 / 2.0, the medians move.
    table = ab_kernel.format_table(
        [("fp8", "this tree", 3), ("fp8", "old", 3), ("pth", "this tree", 2)],
        [[1.0, 2.0, 1.0], [0.5, 1.0, 0.5], [2.0, 4.0, 2.0]])
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    assert [row[3:] for row in rows] == [["1.000", "1.000", "1.000 |"], ["0.500", "0.500", "0.500 |"],
                                         ["2.000", "1.000", "2.000 |"]]
