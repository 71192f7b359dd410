"""examples/quickstart.py, the README's API end to end, runs on a CPU as a new user would run it."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_runs_on_cpu_and_matches_the_oracle(tmp_path):
    # A user's shell: not the repository root, no interpreter switch from this suite's conftest.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--device", "cpu"],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "computed by 'sdpa'" in result.stdout  # the one backend a plain CPU has for an fp8 query
    assert "||out - oracle|| / ||oracle|| = " in result.stdout
    assert "chosen: sdpa" in result.stdout  # explain's table is printed
