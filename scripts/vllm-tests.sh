#!/usr/bin/env bash
# The vLLM plugin's tests (tests/vllm) in their own virtual environment: vLLM 0.33.0 on the CPU.
#
# vLLM does not go into the main test environment: it pins torch 2.14 (the main one has 2.13) and
# brings ~1 GB of its own. This builds a fresh environment (about 6.6 GB, 1.5-2 minutes of pip) with
# torch 2.14.1 (vLLM pins 2.14.0, which is not on this machine's disk; pip only warns), vLLM's wheel
# without its dependency tree (CUDA kernels, flashinfer, ...: nothing these tests import), the
# modules vLLM's attention classes and ModelConfig import, pinned inside vLLM's own ranges, and
# this project (editable, so the vllm.general_plugins entry point is installed). Then it runs the
# tests under Triton's interpreter with no GPU and no network.
#
#   bash scripts/vllm-tests.sh [PYTEST_ARGS...]
#
# VLLM_TESTS_VENV  where the environment goes (default: $TMPDIR or /tmp, attention-dispatch-vllm-venv);
#                  it is deleted and rebuilt on every run unless
# VLLM_TESTS_REUSE=1, which keeps an environment built with the same pins (for development loops).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VLLM_TESTS_VENV:-${TMPDIR:-/tmp}/attention-dispatch-vllm-venv}"
NEEDED_GB=8
TORCH="torch==2.14.1"
VLLM="vllm==0.33.0"
# What `import vllm`, the Triton attention backend, its metadata builder and ModelConfig import,
# at the versions tested (inside vLLM 0.33.0's requirement ranges), plus pytest.
IMPORTS=(
    numpy==2.4.6 packaging==26.4 regex==2026.11.19 requests==2.34.2 psutil==7.2.2 pyzmq==27.3.0
    pydantic==2.14.4 cbor2==6.3.0 transformers==5.20.2 aiohttp==3.14.5 openai-harmony==0.0.8
    openai==3.57.0 pillow==13.0.0 pybase64==1.5.1 cachetools==8.0.2 msgspec==0.23.0 cloudpickle==3.1.3
    uvloop==0.23.0 py-cpuinfo==9.0.0 prometheus_client==0.26.0 xgrammar==0.2.8 fastapi==0.136.3
    partial_json_parser==0.2.1.1.post7 llguidance==1.7.6 einops==0.8.2 pytest==9.2.0
)
PINS="$TORCH $VLLM ${IMPORTS[*]}"

pip_install() {
    # pip warns once per package about this machine's local index folders; those lines are noise.
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

if [[ "${VLLM_TESTS_REUSE:-0}" == 1 && -f "$VENV/pins.txt" && "$(cat "$VENV/pins.txt")" == "$PINS" ]]; then
    echo "vllm-tests: reusing $VENV (VLLM_TESTS_REUSE=1, same pins)"
else
    parent="$(dirname "$VENV")"
    mkdir -p "$parent"
    rm -rf "$VENV"
    free_kb="$(df -Pk "$parent" | awk 'NR == 2 {print $4}')"
    if (( free_kb < NEEDED_GB * 1024 * 1024 )); then
        echo "vllm-tests: the environment needs about ${NEEDED_GB} GB free under $parent; there are" \
             "$(( free_kb / 1024 / 1024 )) GB (set VLLM_TESTS_VENV to a folder with room)" >&2
        exit 1
    fi
    echo "vllm-tests: building $VENV ($TORCH, $VLLM)"
    start=$SECONDS
    python3 -m venv "$VENV"
    pip_install "$TORCH"
    pip_install --no-deps "$VLLM"
    pip_install "${IMPORTS[@]}"
    echo "$PINS" > "$VENV/pins.txt"
    echo "vllm-tests: environment built in $(( SECONDS - start )) s"
fi
# The project itself, every time: editable, without dependencies (torch and pydantic are there).
pip_install --no-deps -e .

export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" HF_HUB_OFFLINE=1
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/vllm "$@"
