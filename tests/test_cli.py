"""`python -m dispatch ...` run as a user runs it: subprocesses, their output and exit codes."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPATCH_BACKEND", "DISPATCH_CONFIG", "TRITON_INTERPRET")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "dispatch", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)


def test_list_shows_every_backend_and_its_record():
    result = run("list")
    assert result.returncode == 0, result.stderr
    for name in ("triton", "flash_attn", "sdpa"):
        assert f"\n{name}: " in result.stdout
    assert "auto order: triton, flash_attn, sdpa" in result.stdout
    assert "\ntriton: importable (triton: triton " in result.stdout  # the version found
    assert "\nsdpa: importable (torch: torch " in result.stdout
    data = json.loads(run("list", "--json").stdout)
    sdpa = next(b for b in data["backends"] if b["name"] == "sdpa")
    assert sdpa["importable"] and "INT8_PER_TOKEN_HEAD" in sdpa["capability"]["kv_quant_modes"]


def test_explain_a_file_marks_the_chosen_backend_per_profile():
    result = run("explain", str(EXAMPLES / "fp8-deployment.yaml"), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    for profile in ("default", "bf16_query", "per_token_head"):
        assert f"== {profile} ==" in result.stdout
    assert "=> sdpa" in result.stdout
    assert "device='cpu' needs TRITON_INTERPRET=1" in result.stdout


def test_explain_one_layer_as_json():
    result = run("explain", str(EXAMPLES / "gemma-style-sliding.json"), "--layer", "5", "--device", "cpu", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert list(data) == ["layer 5"]
    assert data["layer 5"]["config"]["sliding_window"] is None and data["layer 5"]["chosen"] == "sdpa"


def test_explain_exits_1_when_a_profile_has_no_backend(tmp_path):
    path = tmp_path / "named.toml"
    path.write_text('num_heads = 4\nnum_kv_heads = 2\nhead_size = 64\nq_dtype = "fp16"\nkv_cache_dtype = "fp16"\n'
                    '[profiles.ok]\nbackend = "sdpa"\n[profiles.refused]\nbackend = "triton"\n')
    result = run("explain", str(path), "--device", "cpu")
    assert result.returncode == 1
    assert "== refused ==" in result.stdout and "chosen: none" in result.stdout
    assert run("explain", str(path), "--profile", "ok", "--device", "cpu").returncode == 0


def test_explain_from_fields():
    result = run("explain", "num_heads=8", "num_kv_heads=2", "head_size=64", "q_dtype=fp8", "kv_cache_dtype=int8",
                 "--device", "cpu")
    assert result.returncode == 1
    assert "error: " in result.stderr and "q_dtype=float8_e4m3fn requires kv_quant_mode=FP8_PER_TENSOR" in result.stderr


def test_check_ok_and_problems(tmp_path):
    ok = run("check", str(EXAMPLES / "gemma-style-sliding.json"))
    assert ok.returncode == 0 and ": ok (3 profiles: default, sliding, full" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('num_heads = 8\nnum_kv_heads = 2\nhead_size = 64\nblok_size = 16\n')
    result = run("check", str(bad))
    assert result.returncode == 1
    assert result.stdout.strip() == f"{bad}: blok_size: unknown key 'blok_size'; did you mean 'block_size'?"
    data = json.loads(run("check", str(bad), "--json").stdout)
    assert data["ok"] is False and len(data["problems"]) == 1


def test_environment_backend_reaches_explain():
    result = run("explain", str(EXAMPLES / "llama3-8b-bf16.toml"), "--profile", "default", "--device", "cpu",
                 env_extra={"DISPATCH_BACKEND": "sdpa"})
    assert result.returncode == 0
    assert "backend: sdpa" in result.stdout


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_selftest_on_cpu(extra):
    result = run("selftest", "--device", "cpu", *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    if extra:
        data = json.loads(result.stdout)
        statuses = {(r["config"], r["backend"]): r["status"] for r in data["results"]}
        assert statuses[("fp8q-fp8kv-per-tensor", "sdpa")] == "pass"
    else:
        assert "fp8q-fp8kv-per-tensor" in result.stdout and " 0 failed" in result.stdout
