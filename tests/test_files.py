"""Config files: three formats, profiles, layer maps, every error path, and the override precedence."""

import asyncio
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import threading
import tracemalloc

import pytest

import dispatch
from dispatch import AttentionConfig, load_config, load_profiles
from dispatch.capabilities import DeviceInfo
from dispatch.files import check_file, load_file

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
CPU = DeviceInfo(type="cpu", name="cpu")

TOML = """
num_heads = 8
num_kv_heads = 2
head_size = 64
q_dtype = "bf16"
kv_cache_dtype = "fp8"
kv_quant_mode = "fp8_per_tensor"

[profiles.decode]
block_size = 128
sliding_window = 256

[layers]
"0-1" = "decode"
"2" = "default"
"""
YAML = """
num_heads: 8
num_kv_heads: 2
head_size: 64
q_dtype: bf16
kv_cache_dtype: fp8
kv_quant_mode: fp8_per_tensor
profiles:
  decode:
    block_size: 128
    sliding_window: 256
layers:
  "0-1": decode
  "2": default
"""
JSON = json.dumps({
    "num_heads": 8, "num_kv_heads": 2, "head_size": 64, "q_dtype": "bf16", "kv_cache_dtype": "fp8",
    "kv_quant_mode": "fp8_per_tensor", "profiles": {"decode": {"block_size": 128, "sliding_window": 256}},
    "layers": {"0-1": "decode", "2": "default"},
})


@pytest.fixture(autouse=True)
def no_env_override(monkeypatch):
    monkeypatch.delenv("DISPATCH_BACKEND", raising=False)
    monkeypatch.delenv("DISPATCH_CONFIG", raising=False)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_three_formats_give_equal_configs(tmp_path):
    loaded = [load_profiles(write(tmp_path, n, t)) for n, t in (("a.toml", TOML), ("a.yaml", YAML), ("a.json", JSON))]
    assert loaded[0] == loaded[1] == loaded[2]
    profiles = loaded[0]
    assert set(profiles) == {"default", "decode"}
    assert profiles["default"] == AttentionConfig(num_heads=8, num_kv_heads=2, head_size=64, q_dtype="bfloat16",
                                                  kv_cache_dtype="float8_e4m3fn", kv_quant_mode="FP8_PER_TENSOR")
    assert profiles["decode"] == profiles["default"].model_copy(update={"block_size": 128, "sliding_window": 256})


def test_load_config_and_layer_map(tmp_path):
    path = write(tmp_path, "a.toml", TOML)
    assert load_config(path).block_size == 16
    assert load_config(path, "decode").block_size == 128
    assert dispatch.config_for_layer(path, 0).sliding_window == 256
    loaded = load_file(path)
    assert dispatch.config_for_layer(loaded, 2).sliding_window is None
    with pytest.raises(ValueError, match=r"layers: layer 3 is not mapped \(covered: 0-2, and no '\*'\)"):
        dispatch.config_for_layer(loaded, 3)


def test_star_covers_every_other_layer():
    loaded = load_file(EXAMPLES / "gemma-style-sliding.json")
    assert loaded.config_for_layer(5).sliding_window is None
    assert loaded.config_for_layer(11).sliding_window is None
    assert loaded.config_for_layer(0).sliding_window == 4096
    assert loaded.config_for_layer(1000).sliding_window == 4096


@pytest.mark.parametrize("name", ["llama3-8b-bf16.toml", "fp8-deployment.yaml", "gemma-style-sliding.json"])
def test_examples_load(name):
    profiles = load_profiles(EXAMPLES / name)
    assert "default" in profiles
    assert all(isinstance(c, AttentionConfig) for c in profiles.values())


@pytest.mark.parametrize(
    "text,message",
    [
        ('num_heads = 8\nnum_kv_heads = 2\nhead_size = 64\nsliding_windw = 4\n',
         "sliding_windw: unknown key 'sliding_windw'; did you mean 'sliding_window'?"),
        ('num_heads = 8\nnum_kv_heads = 2\nhead_size = 64\n[profiles.x]\nq_dtyp = "fp16"\n',
         "profiles.x.q_dtyp: unknown key 'q_dtyp'; did you mean 'q_dtype'?"),
        ('num_heads = 8\nnum_kv_heads = 2\nhead_size = 64\n[profiles.x]\nq_dtype = "fp64"\n',
         "profiles.x.q_dtype: unknown dtype 'fp64'"),
        ('num_heads = 8\nnum_kv_heads = 3\nhead_size = 64\n',
         "(top level): num_heads=8 must be a multiple of num_kv_heads=3"),
        ('num_heads = 8\nnum_kv_heads = 2\nhead_size = 64\n[layers]\n"0-3" = "default"\n"3-4" = "default"\n',
         "layers.3-4: layer 3 is already mapped to 'default' (ranges overlap)"),
        ('num_heads = 8\nnum_kv_heads = 2\nhead_size = 64\n[layers]\n"0-3,2-5" = "default"\n',
         "layers.0-3,2-5: layer 2 is already mapped to 'default' (ranges overlap)"),
        ('num_heads = 8\nnum_kv_heads = 2\nhead_size = 64\n[layers]\n"0-1" = "default"\n"4" = "default"\n',
         "layers: layers 2-3 are not mapped; map them or add '*' for the rest"),
        ('num_heads = 8\nnum_kv_heads = 2\nhead_size = 64\n[layers]\n"0" = "decod"\n[profiles.decode]\n',
         "layers.0: unknown profile 'decod'; did you mean 'decode'?"),
        ('num_heads = 8\nnum_kv_heads = 2\nhead_size = 64\n[layers]\n"a-b" = "default"\n',
         "layers.a-b: expected layer indices or ranges such as '0-3', '4,6,8' or '*', got 'a-b'"),
        ('num_heads = 8\nnum_kv_heads = 2\nhead_size = 64\n[profiles.default]\nhead_size = 128\n',
         "profiles.default: reserved for the top-level fields"),
        ('num_heads = 8\nnum_kv_heads = [\n', "not valid TOML"),
    ],
)
def test_errors_name_the_file_and_the_key_path(tmp_path, text, message):
    path = write(tmp_path, "bad.toml", text)
    with pytest.raises(ValueError) as info:
        load_profiles(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_unknown_file_types_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config file type '.ini'"):
        load_config(write(tmp_path, "a.ini", "x=1"))
    with pytest.raises(ValueError, match="no such config file"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ValueError, match="no config file given and DISPATCH_CONFIG is not set"):
        load_config()
    with pytest.raises(ValueError, match=r"profiles.nope: unknown profile 'nope'; valid profiles: default, decode"):
        load_config(write(tmp_path, "a.toml", TOML), "nope")


def test_yaml_without_pyyaml_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # makes `import yaml` raise ImportError
    with pytest.raises(ValueError, match=r"reading YAML needs pyyaml.*pip install 'attention-dispatch\[yaml\]'"):
        load_config(write(tmp_path, "a.yaml", YAML))


def test_dispatch_config_names_the_default_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DISPATCH_CONFIG", str(write(tmp_path, "a.toml", TOML)))
    assert load_config().num_heads == 8


def test_backend_precedence(tmp_path, monkeypatch):
    """call argument > use() scope > file > default (DISPATCH_BACKEND, read at import: the next test)."""
    path = write(tmp_path, "a.toml", TOML)
    with_file_backend = write(tmp_path, "b.toml", 'backend = "flash_attn"\n' + TOML)
    assert load_config(path).backend == "auto"  # default
    assert load_config(with_file_backend).backend == "flash_attn"  # file
    with dispatch.use(backend="sdpa"):
        assert load_config(with_file_backend).backend == "sdpa"  # scope beats file
        assert load_config(with_file_backend, backend="triton").backend == "triton"  # call argument wins
    assert load_config(with_file_backend).backend == "flash_attn"  # scope restored
    # The variable is read once, when dispatch is imported: setting it later changes nothing.
    monkeypatch.setenv("DISPATCH_BACKEND", "triton")
    assert load_config(with_file_backend).backend == "flash_attn"


def run_python(code, env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPATCH_BACKEND", "DISPATCH_CONFIG")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          cwd=pathlib.Path(__file__).resolve().parents[1], timeout=120)


def test_environment_backend_sits_between_the_scope_and_the_file(tmp_path):
    with_file_backend = write(tmp_path, "b.toml", 'backend = "flash_attn"\n' + TOML)
    code = f"""
        import dispatch
        path = {str(with_file_backend)!r}
        print(dispatch.load_config(path).backend)                    # env beats file
        with dispatch.use(backend="sdpa"):
            print(dispatch.load_config(path).backend)                # scope beats env
        print(dispatch.load_config(path, backend="flash_attn").backend)  # call argument wins
    """
    result = run_python(code, {"DISPATCH_BACKEND": " Triton "})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["triton", "sdpa", "flash_attn"]


def test_an_unknown_environment_backend_names_the_variable(tmp_path):
    path = write(tmp_path, "a.toml", TOML)
    code = f"""
        import dispatch
        try:
            dispatch.load_config({str(path)!r})
        except ValueError as exc:
            print(exc)
    """
    result = run_python(code, {"DISPATCH_BACKEND": "flashinfr"})
    assert result.returncode == 0, result.stderr  # importing dispatch does not fail
    assert result.stdout.startswith("DISPATCH_BACKEND: unknown backend 'flashinfr'; valid options are 'auto' or ")


def test_use_steers_auto_configs_at_call_time():
    config = AttentionConfig(num_heads=4, num_kv_heads=2, head_size=32, q_dtype="fp16", kv_cache_dtype="fp16")
    named = config.model_copy(update={"backend": "sdpa"})
    dispatch.register_backend("fake_first", capability=dispatch.select(named, CPU).capability,
                              forward=lambda *a, **k: None)
    try:
        assert dispatch.select(config, CPU).name == "sdpa"
        with dispatch.use(order=["fake_first", "sdpa"]):
            assert dispatch.select(config, CPU).name == "fake_first"
            assert dispatch.explain(config, CPU).order == ("fake_first", "sdpa")
            with dispatch.use(backend="sdpa"):
                assert dispatch.select(config, CPU).name == "sdpa"
        with dispatch.use(backend="fake_first"):
            assert dispatch.select(named, CPU).name == "sdpa"  # a config that names a backend keeps it
        assert dispatch.select(config, CPU).name == "sdpa"
        with pytest.raises(dispatch.UnsupportedConfigError, match="unknown backend 'nope'"):
            with dispatch.use(order=["nope"]):
                dispatch.select(config, CPU)
    finally:
        dispatch.unregister_backend("fake_first")


def test_use_is_scoped_per_thread_and_per_task():
    config = AttentionConfig(num_heads=4, num_kv_heads=2, head_size=32, q_dtype="fp16", kv_cache_dtype="fp16")
    seen = {}
    barrier = threading.Barrier(2, timeout=60)

    def worker(name, backend):
        with dispatch.use(backend=backend):
            barrier.wait()
            seen[name] = dispatch.files.resolve_backend(None, None)

    threads = [threading.Thread(target=worker, args=("a", "sdpa")), threading.Thread(target=worker, args=("b", "triton"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"a": "sdpa", "b": "triton"}

    async def task(backend):
        with dispatch.use(backend=backend):
            await asyncio.sleep(0)
            return dispatch.files.resolve_backend(None, None)

    async def both():
        return await asyncio.gather(task("sdpa"), task("triton"))

    assert asyncio.run(both()) == ["sdpa", "triton"]
    assert dispatch.files.resolve_backend(None, None) == "auto"
    assert dispatch.select(config, CPU).name == "sdpa"


@pytest.mark.parametrize(
    "name,text,message",
    [
        ("a.yaml", "num_heads: 8\nnum_kv_heads: 2\nhead_size: 64\nnum_heads: 16\n",
         "num_heads: duplicate key 'num_heads' (line 4; first on line 1)"),
        ("a.yaml", "num_heads: 8\nnum_kv_heads: 2\nhead_size: 64\nprofiles:\n  x:\n    block_size: 32\n"
                   "    block_size: 64\n", "profiles.x.block_size: duplicate key 'block_size' (line 7; first on line 6)"),
        ("a.json", '{"num_heads": 8, "num_kv_heads": 2, "head_size": 64, "head_size": 128}',
         "head_size: duplicate key 'head_size'"),
        ("a.json", '{"num_heads": 8, "num_kv_heads": 2, "head_size": 64, "profiles": {"x": {"causal": true, '
                   '"causal": false}}}', "profiles.x.causal: duplicate key 'causal'"),
    ],
)
def test_duplicate_keys_are_refused_by_name(tmp_path, name, text, message):
    path = write(tmp_path, name, text)
    with pytest.raises(ValueError) as info:
        load_profiles(path)
    assert f"{path}: {message}" in str(info.value)


def test_yaml_true_is_not_a_window_of_one(tmp_path):
    path = write(tmp_path, "a.yaml", "num_heads: 8\nnum_kv_heads: 2\nhead_size: 64\nsliding_window: true\n")
    with pytest.raises(ValueError) as info:
        load_config(path)
    assert f"{path}: sliding_window: expected an integer number of tokens or None (off), got True (bool)" in str(
        info.value)


def test_a_layer_map_costs_no_memory_per_layer(tmp_path):
    path = write(tmp_path, "a.toml", 'num_heads = 8\nnum_kv_heads = 2\nhead_size = 64\n[layers]\n'
                                     '"0-2000000" = "default"\n')
    tracemalloc.start()
    try:
        loaded = load_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000, f"loading a 2M-layer range took {peak} bytes"
    assert loaded.config_for_layer(2_000_000).num_heads == 8
    with pytest.raises(ValueError, match=r"layer 2000001 is not mapped \(covered: 0-2000000, and no '\*'\)"):
        loaded.config_for_layer(2_000_001)


def test_huge_layer_indices(tmp_path):
    head = 'num_heads = 8\nnum_kv_heads = 2\nhead_size = 64\n[profiles.x]\nblock_size = 32\n[layers]\n'
    loaded = load_file(write(tmp_path, "a.toml", head + '"0-100000000" = "default"\n"100000001-1000000000" = "x"\n'))
    assert loaded.config_for_layer(100_000_000).block_size == 16
    assert loaded.config_for_layer(100_000_001).block_size == 32
    assert loaded.config_for_layer(1_000_000_000).block_size == 32
    with pytest.raises(ValueError, match=r"layers: layers 0-999999999 are not mapped; map them or add '\*'"):
        load_file(write(tmp_path, "b.toml", head + '"1000000000" = "x"\n'))
    with pytest.raises(ValueError, match=r"layers.5-1000000000: layer 100000000 is already mapped to 'default' "
                                         r"\(ranges overlap\)"):
        load_file(write(tmp_path, "c.toml", head + '"100000000-200000000" = "default"\n"0-4" = "x"\n'
                                                   '"5-1000000000" = "x"\n'))


@pytest.mark.parametrize("name", ["a.toml", "a.yaml", "a.json"])
def test_a_file_that_is_not_utf8_is_named(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b'num_heads = 8\n# caf\xe9\n')
    with pytest.raises(ValueError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: not UTF-8 text: byte 0xe9 at offset 19")


def test_a_utf8_byte_order_mark_is_allowed(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b"\xef\xbb\xbf" + JSON.encode())
    assert load_config(path).num_heads == 8


BROKEN = """
num_heads = 8
num_kv_heads = 3
head_size = 64
blok_size = 16
backend = "flashinfr"

[profiles.x]
sliding_windw = 5
causal = "yes"

[profiles.y]
backend = "sdpa"
head_size = 0

[layers]
"0-3" = "x"
"3" = "z"
"5" = "y"
"""


def test_every_problem_in_one_run(tmp_path):
    path = write(tmp_path, "broken.toml", BROKEN)
    expected = [
        "blok_size: unknown key 'blok_size'; did you mean 'block_size'?",
        "(top level): num_heads=8 must be a multiple of num_kv_heads=3",
        "profiles.x.sliding_windw: unknown key 'sliding_windw'; did you mean 'sliding_window'?",
        "profiles.x.causal: expected true or false, got 'yes' (str)",
        "profiles.y: head_size must be positive, got 0",
        "layers.3: unknown profile 'z'",
        "layers: layer 4 is not mapped; map it or add '*' for the rest",
    ]
    problems = check_file(path)
    for text in expected:
        assert sum(p.startswith(f"{path}: {text}") for p in problems) == 1, (text, problems)
    # The top-level rule is reported once, not again for each profile that inherits it.
    assert sum("must be a multiple of num_kv_heads=3" in p for p in problems) == 1, problems
    # check_file also checks backend names against the registry (the file's own values).
    assert f"{path}: backend: unknown backend 'flashinfr'; did you mean 'flash_attn'?" in problems
    with pytest.raises(ValueError) as info:
        load_file(path)
    assert str(info.value).splitlines() == [p for p in problems if "flashinfr" not in p]


def test_check_file_of_a_good_file_is_empty():
    assert check_file(EXAMPLES / "gemma-style-sliding.json") == []
