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
