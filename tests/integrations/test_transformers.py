"""transformers models generating through dispatch.attention (dispatch.integrations.transformers), on CPU.

Tiny models built from configs with seeded random weights (no downloads), in float16 (dispatch refuses
float32 queries; the Triton kernel runs under its interpreter, which cannot do bfloat16 dots).

How the comparisons are judged (flash-attention's rule, as in the backend tests): a float64 (GPT-OSS:
float32) eager run of the same weights is the reference; transformers' own eager attention in float16
is the yardstick, and dispatch's error may be at most twice the yardstick's plus 1e-3.

- 16-bit cache: logits of a prefill and several decode steps (crossing a page edge) against the
  reference, and greedy tokens identical to eager's.
- Quantized caches, one layer: dispatch against an emulation that quantizes K and V the documented way
  (float64 scales, float32 quotient, round to nearest, saturate; independent of dispatch.kv_cache) and
  then runs eager attention. With one layer both see bitwise-identical keys and values, so the only
  difference left is attention arithmetic: the same 2x rule applies, with the emulation's float16 run
  as yardstick and its float64-attention run as reference.
- Quantized caches, two layers: a layer's keys depend on the previous layer's output, and a difference
  of one float16 ulp there can move a value across a rounding boundary of the 8-bit format (one fp8
  step is 2^-3 relative), so two correct runs no longer agree to float16 precision. The bound is then
  that dispatch's error against the float64 unquantized reference is at most 1.25 times the emulation's
  (the quantization error itself, with room for such boundary crossings) plus twice the float16
  yardstick.
- Negative controls run the same comparisons on a wrong computation (a non-causal config, a dropped
  scale, sinks dropped) and assert that they fail them.
"""

import functools

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, eager_mask  # noqa: E402

from dispatch import KVQuantMode  # noqa: E402
from dispatch.integrations import transformers as dispatch_hf  # noqa: E402

# (transformers reads meaning into names containing "sdpa" or "flash", so the names avoid them)
SDPA, TRITON, EMULATION = "dispatch_torch_backend", "dispatch_triton_backend", "dispatch_emulation"
PROMPT, TOTAL = 13, 19  # decode steps 13..18 cross the page edge at 16


def within(error: float, yardstick: float, factor: float = 2.0, atol: float = 1e-3) -> bool:
    return error <= factor * yardstick + atol


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ---- the emulation: quantize K and V as documented, then transformers' eager attention ----------------

FORMAT_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0, torch.int8: 127.0}
TINY = torch.finfo(torch.float32).tiny


class Emulation:
    """How the emulated cache quantizes (set per test)."""

    mode = KVQuantMode.NONE
    dtype = torch.float8_e4m3fn
    given = None  # (k_scale, v_scale) for per-tensor with given scales
    headroom = 2.0
    exact_attention = False  # float64 attention over the dequantized keys
    calibrated: dict = {}

    @classmethod
    def set(cls, mode, dtype=torch.float8_e4m3fn, given=None, exact_attention=False):
        cls.mode, cls.dtype, cls.given, cls.exact_attention, cls.calibrated = mode, dtype, given, exact_attention, {}


def fake_quantize(x: torch.Tensor, which: str, layer: int) -> torch.Tensor:
    """x [B, Hkv, S, D] -> dequantized(quantized(x)) in float64, exactly stored * scale (the values
    dispatch's caches mean; the model's own attention rounds them to its dtype)."""
    mode, dtype = Emulation.mode, Emulation.dtype
    if mode is KVQuantMode.NONE:
        return x.double()
    fmax = FORMAT_MAX[dtype]
    if mode is KVQuantMode.FP8_PER_TENSOR:
        if Emulation.given is not None:
            # A given scale reaches the cache as a float32 tensor on the cache's device, as every scale tensor
            # does. On that device: CUDA divides by a CPU scalar as a multiplication by its reciprocal, which
            # rounds exact fp8 ties the other way (15 of 1216 keys for k_scale=0.03 on an H200).
            scale = torch.tensor(Emulation.given[which == "v"], dtype=torch.float32, device=x.device).double()
        else:
            # Calibrated once, on the layer's first call (the prefill): amax * headroom / format max.
            key = (layer, which)
            if key not in Emulation.calibrated:
                Emulation.calibrated[key] = (x.double().abs().max() * Emulation.headroom / fmax).float().double()
            scale = Emulation.calibrated[key]
    else:
        scale = (x.double().abs().amax(-1, keepdim=True) / fmax).float().double()
        scale = torch.where(scale > 0, scale, torch.tensor(TINY, dtype=torch.float64))
    quotient = (x.float() / scale.float()).double()
    if dtype == torch.int8:
        stored = quotient.round().clamp(-127, 127)
    else:
        stored = quotient.clamp(-fmax, fmax).to(dtype).double()
    return stored * scale


def emulation_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.models.llama.modeling_llama import eager_attention_forward

    key = fake_quantize(key, "k", module.layer_idx)
    value = fake_quantize(value, "v", module.layer_idx)
    if Emulation.exact_attention:
        # The reference: float64 attention over the exact dequantized keys and values. (Rounding them to
        # the model's dtype first would make the reference itself off by a bfloat16 rounding of every key.)
        mask = None if attention_mask is None else attention_mask.double()
        out, _ = eager_attention_forward(module, query.double(), key, value, mask, **kwargs)
        return out.to(query.dtype), None
    # The yardstick: the model's own eager attention in its dtype on the dequantized cache.
    return eager_attention_forward(module, query, key.to(query.dtype), value.to(query.dtype), attention_mask,
                                   **kwargs)


@pytest.fixture(scope="module", autouse=True)
def registered():
    dispatch_hf.register(SDPA, backend="sdpa")
    dispatch_hf.register(TRITON, backend="triton")
    AttentionInterface.register(EMULATION, emulation_attention)
    AttentionMaskInterface.register(EMULATION, eager_mask)
    yield


# ---- tiny models ---------------------------------------------------------------------------------------


def llama_config(layers=2):
    return transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                    initializer_range=0.2, pad_token_id=0)


def gemma2_config():
    # Layer 0 slides over 4 keys, layer 1 is full; softcap 5 and scale 8^-0.5 (not head_size^-0.5) in both.
    return transformers.Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                                     attn_logit_softcapping=5.0, query_pre_attn_scalar=8, initializer_range=0.2,
                                     pad_token_id=0)


def gpt_oss_config():
    return transformers.GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                                     num_local_experts=2, num_experts_per_tok=1, initializer_range=0.2,
                                     pad_token_id=0, layer_types=["sliding_attention", "full_attention"])


@functools.lru_cache(maxsize=None)
def _weights(make_config, layers):
    torch.manual_seed(0)
    config = make_config(layers) if layers is not None else make_config()
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float16)
    return model.state_dict()


def build(implementation, dtype=torch.float16, make_config=llama_config, layers=2, device="cpu", **extra):
    """A model with the shared seeded weights of (make_config, layers), in eval mode."""
    config = make_config(layers) if make_config is llama_config else make_config()
    for name, value in extra.items():
        setattr(config, name, value)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=implementation, dtype=dtype)
    model.load_state_dict(_weights(make_config, layers if make_config is llama_config else None))
    return model.to(device).eval()


def token_ids(rows=2, length=TOTAL, seed=5):
    return torch.randint(1, 128, (rows, length), generator=torch.Generator().manual_seed(seed))


def stepwise_logits(model, ids, cache, prompt=PROMPT, after_prefill=None):
    """Prefill ids[:, :prompt], then feed the rest one token at a time (as generate does, with a growing mask):
    float64 logits [B, T, V]."""
    rows, device = ids.shape[0], model.device
    ids = ids.to(device)
    cache_kw = dispatch_hf.cache_argument(model, cache)
    with torch.no_grad():
        logits = [model(input_ids=ids[:, :prompt], attention_mask=torch.ones(rows, prompt, dtype=torch.long,
                                                                              device=device), **cache_kw).logits]
        if after_prefill is not None:
            after_prefill(cache)
        for t in range(prompt, ids.shape[1]):
            mask = torch.ones(rows, t + 1, dtype=torch.long, device=device)
            logits.append(model(input_ids=ids[:, t:t + 1], attention_mask=mask, **cache_kw).logits)
    return torch.cat(logits, dim=1).double().cpu()


def reference_logits(ids, make_config=llama_config, layers=2, dtype=torch.float64, **extra):
    with torch.no_grad():
        return build("eager", dtype, make_config, layers, **extra)(ids).logits.double()


def eager_yardstick(ids, reference, make_config=llama_config, layers=2, **extra):
    model = build("eager", torch.float16, make_config, layers, **extra)
    return max_error(stepwise_logits(model, ids, transformers.DynamicCache(config=model.config)), reference)


def paged(model, mode="none", rows=2, **kwargs):
    return dispatch_hf.PagedKVCache(model, max_batch_size=rows, max_cache_len=32, kv_mode=mode, **kwargs)


# ---- 16-bit cache ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [SDPA, TRITON], ids=["sdpa", "triton"])
def test_sixteen_bit_cache_matches_eager(name):
    ids = token_ids()
    reference = reference_logits(ids)
    yardstick = eager_yardstick(ids, reference)
    model = build(name)
    cache = paged(model)
    error = max_error(stepwise_logits(model, ids, cache), reference)
    assert within(error, yardstick), f"dispatch {error:.4g} vs eager float16 {yardstick:.4g}"
    assert cache.seq_lens() == [TOTAL, TOTAL]
    assert cache.layer_config(0).kv_quant_mode is KVQuantMode.NONE
    assert cache.layer_config(0).backend == {SDPA: "sdpa", TRITON: "triton"}[name]

    eager = build("eager")
    with torch.no_grad():
        expected = eager.generate(ids[:, :PROMPT], max_new_tokens=6, do_sample=False)
        got = model.generate(ids[:, :PROMPT], max_new_tokens=6, do_sample=False,
                             **dispatch_hf.cache_argument(model, paged(model)))
    assert torch.equal(got, expected)


def test_non_causal_config_fails_the_comparison():
    """Negative control: the same comparison catches a model run without its causal mask."""
    ids = token_ids()
    reference = reference_logits(ids)
    yardstick = eager_yardstick(ids, reference)
    model = build(SDPA, is_causal=False)
    cache = paged(model)
    error = max_error(stepwise_logits(model, ids, cache), reference)
    assert cache.layer_config(0).causal is False
    assert not within(error, yardstick), f"a non-causal run passed the comparison ({error:.4g})"


# ---- quantized caches --------------------------------------------------------------------------------------

QUANTIZED = [
    pytest.param("fp8_per_tensor", {}, id="fp8_per_tensor-calibrated"),
    pytest.param("fp8_per_tensor", {"k_scale": 0.03, "v_scale": 0.02}, id="fp8_per_tensor-given"),
    pytest.param("fp8_per_token_head", {}, id="fp8_per_token_head"),
    pytest.param("fp8_per_token_head", {"fp8_dtype": "float8_e5m2"}, id="e5m2_per_token_head"),
    pytest.param("int8_per_token_head", {}, id="int8_per_token_head"),
]


def emulate(mode: str, options: dict, exact_attention=False):
    dtype = {"fp8_per_tensor": torch.float8_e4m3fn, "fp8_per_token_head": torch.float8_e4m3fn,
             "int8_per_token_head": torch.int8}[mode]
    if options.get("fp8_dtype") == "float8_e5m2":
        dtype = torch.float8_e5m2
    given = (options["k_scale"], options["v_scale"]) if "k_scale" in options else None
    Emulation.set(KVQuantMode(mode), dtype, given, exact_attention)


def emulation_logits(ids, mode, options, layers, exact_attention=False, dtype=torch.float16, device="cpu"):
    emulate(mode, options, exact_attention)
    model = build(EMULATION, dtype, layers=layers, device=device)
    return stepwise_logits(model, ids, transformers.DynamicCache(config=model.config))


@pytest.mark.parametrize("mode,options", QUANTIZED)
def test_quantized_cache_matches_its_emulation(mode, options):
    ids = token_ids()
    reference = emulation_logits(ids, mode, options, layers=1, exact_attention=True)
    yardstick = max_error(emulation_logits(ids, mode, options, layers=1), reference)
    model = build(SDPA, layers=1)
    cache = paged(model, mode, **options)
    error = max_error(stepwise_logits(model, ids, cache), reference)
    assert within(error, yardstick), f"dispatch {error:.4g} vs emulation float16 {yardstick:.4g}"
    config = cache.layer_config(0)
    assert config.kv_quant_mode is KVQuantMode(mode)
    assert config.kv_cache_dtype == {"fp8_per_token_head": options.get("fp8_dtype", "float8_e4m3fn"),
                                     "fp8_per_tensor": "float8_e4m3fn", "int8_per_token_head": "int8"}[mode]
    if "k_scale" in options:
        assert torch.equal(cache.layer_scales(0)["k_scale"], torch.tensor([options["k_scale"]]))


def test_quantized_cache_matches_its_emulation_on_triton():
    ids = token_ids()
    options = {}
    reference = emulation_logits(ids, "fp8_per_token_head", options, layers=1, exact_attention=True)
    yardstick = max_error(emulation_logits(ids, "fp8_per_token_head", options, layers=1), reference)
    model = build(TRITON, layers=1)
    error = max_error(stepwise_logits(model, ids, paged(model, "fp8_per_token_head")), reference)
    assert within(error, yardstick), f"dispatch {error:.4g} vs emulation float16 {yardstick:.4g}"


def drop_scale(cache):
    """What a kernel that ignores a scale computes: stored values read with scale 1."""
    scales = cache.layer_scales(0)
    for name in ("k_scale", "v_scale_cache"):
        if name in scales:
            scales[name].fill_(1.0)


@pytest.mark.parametrize("mode", ["fp8_per_tensor", "fp8_per_token_head"])
def test_dropped_scale_fails_the_comparison(mode):
    """Negative control: decode steps that read the prefill's pages without their scale fail the check."""
    ids = token_ids()
    reference = emulation_logits(ids, mode, {}, layers=1, exact_attention=True)
    yardstick = max_error(emulation_logits(ids, mode, {}, layers=1), reference)
    model = build(SDPA, layers=1)
    error = max_error(stepwise_logits(model, ids, paged(model, mode), after_prefill=drop_scale), reference)
    assert not within(error, yardstick), f"a dropped scale passed the comparison ({error:.4g})"


@pytest.mark.parametrize("mode", ["fp8_per_tensor", "fp8_per_token_head", "int8_per_token_head"])
def test_quantized_cache_error_is_the_quantization_error(mode):
    ids = token_ids()
    reference = reference_logits(ids)
    yardstick = eager_yardstick(ids, reference)
    quantization = max_error(emulation_logits(ids, mode, {}, layers=2), reference)
    model = build(SDPA)
    error = max_error(stepwise_logits(model, ids, paged(model, mode)), reference)
    bound = 1.25 * quantization + 2 * yardstick
    assert error <= bound, f"dispatch {error:.4g} > 1.25 x quantization {quantization:.4g} + 2 x {yardstick:.4g}"


# ---- left padding ------------------------------------------------------------------------------------------


def left_padded(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def generate(model, ids, mask, cache, new_tokens=6):
    kwargs = dispatch_hf.cache_argument(model, cache) if cache is not None else {}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, dim=1).double()


@pytest.mark.parametrize("mode", ["none", "fp8_per_token_head", "int8_per_token_head"])
def test_left_padded_batch_matches_single_runs(mode):
    """Rows of 5, 14 and 17 tokens (around the page edge), left-padded to 17: each row generates what it
    generates alone, with the same logits to float16 rounding (pad tokens never enter the cache). The
    yardstick is eager float16's error on that row against float64, along the generated tokens."""
    # A seed whose greedy steps have no near-tie in any mode (top-2 logit gap > 0.12), so equal tokens are
    # expected of any two runs within float16 rounding of each other.
    gen = torch.Generator().manual_seed(32)
    prompts = [torch.randint(1, 128, (n,), generator=gen).tolist() for n in (5, 14, 17)]
    model = build(SDPA)
    ids, mask = left_padded(prompts)
    cache = paged(model, mode, rows=3)
    tokens, logits = generate(model, ids, mask, cache)
    # The last generated token is never fed back: each row holds its prompt and 5 of its 6 new tokens.
    assert cache.seq_lens() == [5 + 5, 14 + 5, 17 + 5]
    for row, prompt in enumerate(prompts):
        single = torch.tensor([prompt])
        single_tokens, single_logits = generate(model, single, torch.ones_like(single), paged(model, mode, rows=1))
        assert torch.equal(tokens[row], single_tokens[0]), f"row {row}"
        sequence = torch.cat([single, single_tokens[:, :-1]], dim=1)
        steps = slice(len(prompt) - 1, sequence.shape[1])  # the positions whose logits generate() returned
        reference = reference_logits(sequence)[0, steps]
        with torch.no_grad():
            yardstick = max_error(build("eager")(sequence).logits[0, steps], reference)
        error = max_error(logits[row], single_logits[0])
        assert within(error, yardstick), f"row {row}: batched vs alone {error:.4g} (eager vs float64 {yardstick:.4g})"


def test_dense_path_without_a_paged_cache():
    """No PagedKVCache: a padded forward without a cache, and generate() with transformers' DynamicCache."""
    gen = torch.Generator().manual_seed(15)  # a seed whose greedy steps have no near-tie (top-2 gap > 0.1)
    prompts = [torch.randint(1, 128, (n,), generator=gen).tolist() for n in (3, 9)]
    ids, mask = left_padded(prompts)
    model, eager = build(SDPA), build("eager")
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        # float32, not float64: eager's float64 mask minimum becomes -inf in its float32 softmax, and a pad row
        # of NaN then leaks into every row through 0 * NaN.
        expected = build("eager", torch.float32)(input_ids=ids, attention_mask=mask).logits
        yardstick = eager(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    error, eager_error = max_error(got[real], expected[real]), max_error(yardstick[real], expected[real])
    assert within(error, eager_error), f"dispatch {error:.4g} vs eager {eager_error:.4g}"
    tokens, _ = generate(model, ids, mask, None)
    eager_tokens, _ = generate(eager, ids, mask, None)
    assert torch.equal(tokens, eager_tokens)


# ---- per-layer settings from the model ----------------------------------------------------------------------


def test_sliding_window_softcap_and_scale_come_from_the_model():
    ids = token_ids()
    reference = reference_logits(ids, gemma2_config)
    yardstick = eager_yardstick(ids, reference, gemma2_config)
    model = build(SDPA, make_config=gemma2_config)
    cache = paged(model)
    error = max_error(stepwise_logits(model, ids, cache), reference)
    assert within(error, yardstick), f"dispatch {error:.4g} vs eager {yardstick:.4g}"
    sliding, full = cache.layer_config(0), cache.layer_config(1)
    assert (sliding.sliding_window, full.sliding_window) == (4, None)
    assert sliding.logits_soft_cap == full.logits_soft_cap == 5.0
    assert sliding.softmax_scale == full.softmax_scale == pytest.approx(8**-0.5)
    settings = dispatch_hf.model_layer_settings(model.config)
    assert [(s.sliding_window, s.logits_soft_cap) for s in settings] == [(4, 5.0), (None, 5.0)]


def test_sinks_come_from_the_model():
    """GPT-OSS passes its per-head sinks as s_aux (float64 eager cannot run its experts: float32 reference)."""
    ids = token_ids()
    with torch.no_grad():
        sinks = torch.randn(2, 4, generator=torch.Generator().manual_seed(3)) * 2.0

    def with_sinks(model):
        for layer, values in zip(model.model.layers, sinks):
            layer.self_attn.sinks.data.copy_(values)
        return model

    with torch.no_grad():
        reference = with_sinks(build("eager", torch.float32, gpt_oss_config)).eval()(ids).logits.double()
    eager = with_sinks(build("eager", make_config=gpt_oss_config))
    yardstick = max_error(stepwise_logits(eager, ids, transformers.DynamicCache(config=eager.config)), reference)
    model = with_sinks(build(SDPA, make_config=gpt_oss_config))
    cache = paged(model)
    error = max_error(stepwise_logits(model, ids, cache), reference)
    assert within(error, yardstick), f"dispatch {error:.4g} vs eager {yardstick:.4g}"
    assert cache.layer_config(0).use_sinks and cache.layer_config(0).sliding_window == 4
    # The sinks matter: without them the same comparison fails.
    without = build(SDPA, make_config=gpt_oss_config)
    for layer in without.model.layers:
        layer.self_attn.sinks.data.fill_(-1e4)
    error = max_error(stepwise_logits(without, ids, paged(without)), reference)
    assert not within(error, yardstick)


# ---- a dispatch config file with a layers map -------------------------------------------------------------

FILE_HEAD = """
num_heads = 4
num_kv_heads = 2
head_size = 16
q_dtype = "fp16"
kv_cache_dtype = "fp16"
"""


def test_config_file_chooses_the_kv_mode_per_layer(tmp_path):
    path = tmp_path / "model.toml"
    path.write_text(FILE_HEAD + """
[profiles.int8]
kv_cache_dtype = "int8"
kv_quant_mode = "INT8_PER_TOKEN_HEAD"
backend = "sdpa"

[layers]
"0" = "default"
"*" = "int8"
""")
    model = build(SDPA)
    cache = dispatch_hf.PagedKVCache(model, max_batch_size=2, max_cache_len=32, config_file=path)
    stepwise_logits(model, token_ids(), cache)
    assert cache.layer_config(0).kv_quant_mode is KVQuantMode.NONE
    assert cache.layer_config(1).kv_quant_mode is KVQuantMode.INT8_PER_TOKEN_HEAD
    assert cache.layer_pages(1)[0].dtype == torch.int8


def test_config_file_that_disagrees_with_the_model_is_refused(tmp_path):
    path = tmp_path / "model.toml"
    path.write_text(FILE_HEAD + "sliding_window = 4\n")
    model = build(SDPA)
    with pytest.raises(dispatch_hf.UnsupportedModelError,
                       match=r"layer 0: the dispatch config file disagrees with the model: sliding_window=4 but the "
                             r"model has None"):
        dispatch_hf.PagedKVCache(model, max_batch_size=2, max_cache_len=32, config_file=path)
    with pytest.raises(ValueError, match="give either kv_mode or config_file"):
        dispatch_hf.PagedKVCache(model, max_batch_size=2, max_cache_len=32, config_file=path, kv_mode="none")


# ---- refusals ------------------------------------------------------------------------------------------------


def test_float32_model_is_refused():
    model = build(SDPA, torch.float32)
    with pytest.raises(dispatch_hf.UnsupportedModelError, match=r"the model runs in torch.float32"):
        paged(model)
    with torch.no_grad(), pytest.raises(dispatch_hf.UnsupportedModelError,
                                        match=r"layer 0: query dtype torch.float32: dispatch runs float16 and "
                                              r"bfloat16 models"):
        model(token_ids())


def test_what_dispatch_cannot_compute_is_refused():
    model = build(SDPA)
    ids = token_ids()
    with pytest.raises(dispatch_hf.UnsupportedModelError, match="no backward pass"):
        model(ids)  # gradients enabled
    with torch.no_grad():
        with pytest.raises(dispatch_hf.UnsupportedModelError, match="output_attentions=True"):
            model(ids, output_attentions=True)
        four_d = torch.zeros(2, 1, TOTAL, TOTAL, dtype=torch.float16)
        with pytest.raises(dispatch_hf.UnsupportedModelError, match="ready-made Tensor attention mask"):
            model(ids, attention_mask=four_d)
        right_padded = torch.ones(2, TOTAL, dtype=torch.long)
        right_padded[0, -2:] = 0
        with pytest.raises(dispatch_hf.UnsupportedModelError, match=r"rows \[0\] are not left-padded"):
            model(ids, attention_mask=right_padded)
        with pytest.raises(dispatch_hf.UnsupportedModelError, match=r"rows \[0\] are not left-padded"):
            model(ids, attention_mask=right_padded, **dispatch_hf.cache_argument(model, paged(model)))
    attention = AttentionInterface._global_mapping[SDPA]
    module = model.model.layers[0].self_attn
    q, k = torch.zeros(1, 4, 3, 16, dtype=torch.float16), torch.zeros(1, 2, 3, 16, dtype=torch.float16)
    with torch.no_grad():
        with pytest.raises(dispatch_hf.UnsupportedModelError, match=r"unknown attention keyword\(s\) \['top_k'\]"):
            attention(module, q, k, k, None, dropout=0.0, scaling=0.25, top_k=2)
        with pytest.raises(dispatch_hf.UnsupportedModelError, match=r"dropout=0.1"):
            attention(module, q, k, k, None, dropout=0.1, scaling=0.25)
        with pytest.raises(dispatch_hf.UnsupportedModelError, match=r"cu_seq_lens_q is set"):
            attention(module, q, k, k, None, scaling=0.25, cu_seq_lens_q=torch.tensor([0, 3]))


def test_dropout_in_training_is_refused():
    model = build(SDPA, attention_dropout=0.1)
    model.train()
    with torch.no_grad(), pytest.raises(dispatch_hf.UnsupportedModelError, match=r"dropout=0.1"):
        model(token_ids())


def test_masks_dispatch_cannot_express_are_refused():
    from transformers.masking_utils import chunked_causal_mask_function, or_masks, causal_mask_function

    mask_function = AttentionMaskInterface._global_mapping[SDPA]
    chunked = chunked_causal_mask_function(8, torch.zeros(1, dtype=torch.long))
    with pytest.raises(dispatch_hf.UnsupportedModelError, match="which dispatch cannot express"):
        mask_function(batch_size=1, q_length=4, kv_length=4, mask_function=chunked)
    overlay = or_masks(causal_mask_function, lambda b, h, q, kv: kv == 0)
    with pytest.raises(dispatch_hf.UnsupportedModelError, match="which dispatch cannot express"):
        mask_function(batch_size=1, q_length=4, kv_length=4, mask_function=overlay)
    with pytest.raises(dispatch_hf.UnsupportedModelError, match=r"unknown mask keyword\(s\) \['block_size'\]"):
        mask_function(batch_size=1, q_length=4, kv_length=4, block_size=8)


def test_paged_cache_refuses_what_it_cannot_hold():
    with pytest.raises(dispatch_hf.UnsupportedModelError, match=r"attn_implementation is 'eager'"):
        paged(build("eager"))
    model = build(SDPA)
    ids = token_ids()
    with torch.no_grad():
        with pytest.raises(NotImplementedError, match="PagedKVCache: beam search"):
            model.generate(ids[:, :PROMPT], max_new_tokens=2, num_beams=2, do_sample=False,
                           **dispatch_hf.cache_argument(model, paged(model, rows=4)))
        with pytest.raises(dispatch_hf.UnsupportedModelError, match=r"more than max_cache_len=32"):
            model(torch.ones(2, 33, dtype=torch.long), **dispatch_hf.cache_argument(model, paged(model)))
        with pytest.raises(dispatch_hf.UnsupportedModelError, match=r"batch of 3 rows, but max_batch_size=2"):
            model(torch.ones(3, 4, dtype=torch.long), **dispatch_hf.cache_argument(model, paged(model)))
    with pytest.raises(ValueError, match=r"kv_mode: expected one of"):
        paged(model, "fp4")
    with pytest.raises(ValueError, match=r"k_scale, v_scale: only for kv_mode=FP8_PER_TENSOR"):
        paged(model, "fp8_per_token_head", k_scale=0.1, v_scale=0.1)


def test_a_forward_that_failed_part_way_is_not_built_upon():
    model = build(SDPA)
    cache = paged(model)
    ids = token_ids()
    layer = model.model.layers[0].mlp  # after layer 0's attention, before layer 1's
    original = layer.forward

    def failing(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    layer.forward = failing
    with torch.no_grad(), pytest.raises(RuntimeError, match="simulated"):
        model(ids[:, :PROMPT], **dispatch_hf.cache_argument(model, cache))
    layer.forward = original
    with torch.no_grad(), pytest.raises(dispatch_hf.UnsupportedModelError, match="attended 1 of 2 layers"):
        model(ids[:, :PROMPT], **dispatch_hf.cache_argument(model, cache))
    cache.reset()
    reference = stepwise_logits(model, ids, paged(model))
    assert torch.equal(stepwise_logits(model, ids, cache), reference)


def test_reset_frees_the_pages_for_a_new_batch():
    model = build(SDPA)
    cache = paged(model, "fp8_per_tensor")
    ids = token_ids()
    first = stepwise_logits(model, ids, cache)
    used = cache.used_bytes()
    assert 0 < used <= cache.memory_bytes()
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.used_bytes() == 0
    assert torch.equal(stepwise_logits(model, ids, cache), first)


# ---- on a GPU: bfloat16, the backend auto picks (the Triton kernel on an H100 / H200) ---------------------------


@pytest.mark.gpu
def test_gpu_bf16_sixteen_bit_cache_matches_eager():
    ids = token_ids()
    reference = reference_logits(ids)
    eager = build("eager", torch.bfloat16, device="cuda")
    yardstick = max_error(stepwise_logits(eager, ids, transformers.DynamicCache(config=eager.config)), reference)
    dispatch_hf.register("dispatch_auto_backend")
    model = build("dispatch_auto_backend", torch.bfloat16, device="cuda")
    cache = paged(model)
    error = max_error(stepwise_logits(model, ids, cache), reference)
    assert within(error, yardstick), f"dispatch {error:.4g} vs eager bfloat16 {yardstick:.4g}"


@pytest.mark.gpu
@pytest.mark.parametrize("mode,options", QUANTIZED)
def test_gpu_bf16_quantized_cache_matches_its_emulation(mode, options):
    ids = token_ids()
    reference = emulation_logits(ids, mode, options, 1, True, torch.bfloat16, "cuda")
    yardstick = max_error(emulation_logits(ids, mode, options, 1, False, torch.bfloat16, "cuda"), reference)
    dispatch_hf.register("dispatch_auto_backend")
    model = build("dispatch_auto_backend", torch.bfloat16, layers=1, device="cuda")
    error = max_error(stepwise_logits(model, ids, paged(model, mode, **options)), reference)
    assert within(error, yardstick), f"dispatch {error:.4g} vs emulation bfloat16 {yardstick:.4g}"
