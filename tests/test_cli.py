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


def no_traceback(result):
    return "Traceback" not in result.stderr and "Traceback" not in result.stdout


def test_version_matches_the_project_metadata():
    import tomllib

    import dispatch

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert dispatch.__version__ == version
    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"attention-dispatch {version}"


def test_version_without_installed_metadata_falls_back_to_pyproject(tmp_path):
    """Run from a source tree on PYTHONPATH (the GPU machine does), with no distribution installed."""
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    code = ("import importlib.metadata as m\n"
            "def missing(name):\n    raise m.PackageNotFoundError(name)\n"
            "m.version = missing\n"
            "import dispatch\nprint(dispatch.__version__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == version, result.stderr


def test_license_and_typing_marker_ship_with_the_package():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a pointer to it
    assert (ROOT / "dispatch" / "py.typed").is_file()
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["dispatch"]


def test_explain_a_missing_file_says_so():
    result = run("explain", "nonexist.toml")
    assert result.returncode == 1 and no_traceback(result)
    assert result.stderr.strip() == "error: nonexist.toml: no such config file"
    result = run("check", "nonexist.toml")
    assert result.returncode == 1 and result.stdout.strip() == "nonexist.toml: no such config file"


@pytest.mark.parametrize("command", [["explain", "num_heads=8", "num_kv_heads=2", "head_size=64"], ["selftest"]])
def test_an_unknown_device_is_one_line(command):
    result = run(*command, "--device", "tpu")
    assert result.returncode == 2 and no_traceback(result), result.stderr
    assert result.stderr.strip() == "error: device: expected 'cpu', 'cuda' or 'cuda:N', got 'tpu'"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the behaviour without CUDA")
def test_selftest_on_a_missing_device_fails():
    result = run("selftest", "--device", "cuda")
    assert result.returncode == 2 and no_traceback(result)
    assert result.stderr.strip().startswith("error: --device cuda: CUDA is not available here")
    data = json.loads(run("selftest", "--device", "cuda", "--json").stdout)
    assert data["error"].startswith("--device cuda: CUDA is not available here")


def test_selftest_exits_nonzero_when_nothing_ran(monkeypatch, capsys):
    from dispatch import __main__ as cli
    from dispatch import selftest

    refused = [selftest.SelftestResult("fp16", name, "refused", "not here") for name in ("triton", "sdpa")]
    monkeypatch.setattr(selftest, "run_selftest", lambda device: refused)
    assert cli.main(["selftest", "--device", "cpu"]) == 1
    out = capsys.readouterr()
    assert "0 passed, 0 failed, 2 refused" in out.out
    assert "error: no backend passed a single config on cpu" in out.err
    assert selftest.exit_code(refused) == 1
    assert selftest.exit_code(refused + [selftest.SelftestResult("bf16", "sdpa", "pass", "ok")]) == 0
    assert selftest.exit_code([selftest.SelftestResult("bf16", "sdpa", "pass", "ok"),
                               selftest.SelftestResult("fp16", "sdpa", "fail", "wrong")]) == 1


@pytest.mark.parametrize("args", [["explain", "{path}"], ["explain", "num_heads=True", "num_kv_heads=1", "head_size=64"]])
def test_json_output_carries_the_error(tmp_path, args):
    path = tmp_path / "bad.toml"
    path.write_text("num_heads = 8\nnum_kv_heads = 3\nhead_size = 64\n")
    result = run(*[a.format(path=path) for a in args], "--device", "cpu", "--json")
    assert result.returncode == 1 and no_traceback(result), result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["error"]
    assert "num_heads" in data["error"]


def test_check_reports_every_problem_and_unknown_backends(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('num_heads = 8\nnum_kv_heads = 2\nhead_size = 64\nbackend = "flashinfr"\nblok_size = 16\n'
                    '[profiles.x]\ncausal = "yes"\n')
    result = run("check", str(path))
    assert result.returncode == 1 and no_traceback(result)
    assert result.stdout.splitlines() == [
        f"{path}: blok_size: unknown key 'blok_size'; did you mean 'block_size'?",
        f"{path}: profiles.x.causal: expected true or false, got 'yes' (str)",
        f"{path}: backend: unknown backend 'flashinfr'; did you mean 'flash_attn'?",
    ]
    data = json.loads(run("check", str(path), "--json").stdout)
    assert data["ok"] is False and data["problems"] == result.stdout.splitlines()
    # The same file with a known backend name: explain, which selects, agrees with check.
    path.write_text('num_heads = 8\nnum_kv_heads = 2\nhead_size = 64\nbackend = "flashinfr"\n')
    assert run("check", str(path)).returncode == 1
    assert run("explain", str(path), "--device", "cpu").returncode == 1


def test_output_into_a_closed_pipe_is_quiet():
    """`python -m dispatch list | head -1`: the reader goes away; no BrokenPipeError traceback."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPATCH_BACKEND", "DISPATCH_CONFIG")}
    proc = subprocess.Popen([sys.executable, "-m", "dispatch", "list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT, env=env)
    proc.stdout.close()  # before the command writes anything: its first write meets a closed pipe
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=120)
    proc.stderr.close()
    assert stderr == "", stderr
    assert proc.returncode == 141  # what a shell reports for a tool ended by SIGPIPE (128 + 13)
