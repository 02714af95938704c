"""QLoRA's quantised base (model/quant.py): NF4 and int8 against float64 references, the
in-scan dequantisation against the plain model, and the streaming import."""

import dataclasses
import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsft.config import ConfigError, PeftConfig
from jaxsft.model import hf, paths, peft, quant
from jaxsft.model.transformer import abstract_model, abstract_params

from hf_tiny import forward, load

# bitsandbytes/functional.py `get_4bit_type("nf4")`, copied as printed there (QLoRA paper, appendix E).
BNB_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def test_nf4_levels_are_the_papers_and_bitsandbytes_table():
    from scipy.stats import norm

    np.testing.assert_array_equal(quant.NF4_LEVELS, np.array(BNB_NF4, np.float32))
    # The paper's construction (bitsandbytes `create_normal_map(offset=0.9677083)`): 8 positive
    # and 7 negative normal quantiles plus an exact zero, scaled into [-1, 1].
    offset = 0.9677083
    positive = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    negative = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    levels = np.sort(np.concatenate([positive, [0.0], negative]))
    np.testing.assert_allclose(quant.NF4_LEVELS, levels / levels.max(), atol=1e-7)


def _blocks64(w: np.ndarray, block: int) -> np.ndarray:
    """[in, out] -> [in / block, block, out], float64."""
    return w.astype(np.float64).reshape(w.shape[0] // block, block, w.shape[1])


def test_nf4_codes_bytes_and_round_trip_equal_a_float64_reference():
    w = np.random.default_rng(0).standard_normal((256, 48)).astype(np.float32)
    node = quant.quantize(jnp.asarray(w), (0,), "nf4", 64)
    blocks = _blocks64(w, 64)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    levels = np.array(BNB_NF4, np.float64)
    codes = np.abs(blocks / absmax - levels[:, None, None, None]).argmin(axis=0).reshape(w.shape)
    packed = (codes[0::2] << 4) | codes[1::2]  # pairs along the input axis, first in the high nibble
    np.testing.assert_array_equal(np.asarray(node["codes"]), packed.astype(np.uint8))
    np.testing.assert_allclose(np.asarray(node["scales"]), absmax[:, 0], rtol=1e-7)
    reference = (levels[codes].reshape(blocks.shape) * absmax).reshape(w.shape)
    deq = np.asarray(quant.dequantize(node, (0,)))
    np.testing.assert_allclose(deq, reference, rtol=1e-6, atol=1e-7)
    # Nearest level: never further than half the widest gap between levels (times the block's absmax).
    half_gap = np.diff(levels).max() / 2
    assert np.all(np.abs(deq - w).reshape(blocks.shape) <= half_gap * absmax * (1 + 1e-6))
    assert node["codes"].nbytes == w.size // 2


@pytest.mark.parametrize("block", [64, 0])
def test_int8_round_trip_equals_a_float64_reference(block):
    w = np.random.default_rng(1).standard_normal((2, 128, 40)).astype(np.float32)  # [L, in, out]
    node = quant.quantize(jnp.asarray(w), (1,), "int8", block)
    w64 = w.astype(np.float64).reshape(2, -1 if block else 1, block or 128, 40)
    step = np.abs(w64).max(axis=2, keepdims=True) / 127
    codes = np.round(w64 / step).reshape(w.shape)
    np.testing.assert_array_equal(np.asarray(node["codes"]), codes.astype(np.int8))
    assert node["scales"].shape == ((2, 2, 40) if block else (2, 1, 40))
    deq = np.asarray(quant.dequantize(node, (1,)))
    assert np.all(np.abs(deq - w).reshape(w64.shape) <= step / 2 * (1 + 1e-5))


def test_per_feature_scales_span_every_input_axis_of_o_proj():
    w = np.random.default_rng(2).standard_normal((2, 4, 8, 32)).astype(np.float32)  # [L, n, h, d]
    node = quant.quantize(jnp.asarray(w), quant.in_axes("blocks/attn/o_proj"), "int8", 0)
    assert node["scales"].shape == (2, 1, 1, 32)
    np.testing.assert_allclose(np.asarray(node["scales"])[:, 0, 0], np.abs(w).max(axis=(1, 2)) / 127, rtol=1e-6)
    blocked = quant.quantize(jnp.asarray(w), quant.in_axes("blocks/attn/o_proj"), "nf4", 4)
    assert blocked["codes"].shape == (2, 4, 4, 32) and blocked["scales"].shape == (2, 4, 2, 32)
    assert quant.kernel_shape(blocked, "blocks/attn/o_proj") == w.shape


def test_double_quantisation_stores_int8_scales_within_half_a_step():
    w = np.random.default_rng(3).standard_normal((512, 24)).astype(np.float32)
    plain = quant.quantize(jnp.asarray(w), (0,), "nf4", 64)
    double = quant.quantize(jnp.asarray(w), (0,), "nf4", 64, double_quant=True)
    assert set(double) == {"codes", "scale_codes", "scale_step", "scale_offset"}
    assert double["scale_codes"].dtype == jnp.int8 and double["scale_step"].shape == (1, 24)
    np.testing.assert_array_equal(np.asarray(double["codes"]), np.asarray(plain["codes"]))
    scales = np.asarray(quant._scales(double))
    assert np.all(np.abs(scales - np.asarray(plain["scales"])) <= np.asarray(double["scale_step"]) / 2 * (1 + 1e-5))


def test_nf4_equals_bitsandbytes_bit_for_bit():
    """Optional: bitsandbytes' own CPU quantize_4bit gives the very bytes and scales (HF [out, in])."""
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(0))
    packed, state = functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
    node = quant.quantize(jnp.asarray(w.numpy().T), (0,), "nf4", 64)
    codes = np.asarray(quant._unpack(node["codes"], 0)).T.reshape(-1)
    np.testing.assert_array_equal((codes[0::2] << 4) | codes[1::2], packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(node["scales"]).T.reshape(-1), state.absmax.numpy())


def test_a_block_that_does_not_divide_the_input_axis_is_one_line():
    with pytest.raises(ConfigError, match=r"quant_block_size=64 does not divide blocks/attn/o_proj's input axis \(8"):
        quant.quantize(jnp.zeros((2, 4, 8, 32)), (1, 2), "nf4", 64, name="blocks/attn/o_proj")


# ---------------------------------------------------------------------------- the model


def _tiny_hf_llama(path):
    """A small Llama whose every axis takes blocks of 64 (hidden 256, head dim 64, MLP 512), HF's own init."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).float().save_pretrained(path)
    return path


def _replicated(tree):
    mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:1])
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


def _quantized_import(path, pe: PeftConfig, param_dtype="float32"):
    cfg, vocab = hf.load_config(path)
    cfg = dataclasses.replace(cfg, param_dtype=param_dtype, peft=pe)
    layout = jax.eval_shape(lambda p: quant.quantize_base(p, pe), abstract_params(cfg, vocab))
    return cfg, vocab, hf.load_params(path, cfg, vocab, _replicated(layout))


def _qlora_logits(cfg, vocab, frozen, tokens):
    """Logits of the training path: a fresh LoRA (B = 0) on the quantised base, dequantised in the scan."""
    graphdef = nnx.graphdef(abstract_model(cfg, vocab))
    positions = np.tile(np.arange(tokens.shape[1], dtype=np.int32), (tokens.shape[0], 1))

    @jax.jit
    def logits(frozen):
        trainable, frozen = peft.init(cfg.peft, frozen, jax.random.key(0))
        params, blocks = peft.model_inputs(cfg.peft, trainable, frozen)
        return nnx.merge(graphdef, params)(tokens, positions, np.ones_like(tokens), blocks)

    return np.asarray(logits(frozen))


@pytest.mark.slow  # tens of seconds (pre-flight compiles, trainer runs): `pytest -m slow`
def test_the_scan_dequantises_each_layer_as_the_whole_base_would():
    """Logits and adapter gradients of the training path on a quantised base == the plain model
    on `dequantize_base` (a random 2-layer model, NF4 in blocks of 8, DoRA; no remat, where the
    quantised stack runs under its own checkpoint policy)."""
    from jaxsft.config import ModelConfig
    from jaxsft.train.state import init_params

    pe = PeftConfig(method="dora", targets=("o", "down"), quantize="nf4", quant_block_size=8)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, peft=pe)
    graphdef = nnx.graphdef(abstract_model(cfg, 64))
    trainable, frozen = jax.jit(lambda: peft.init(pe, init_params(cfg, 64, 0), jax.random.key(1)))()
    o_proj = np.asarray(quant.dequantize_base(frozen)["blocks"]["attn"]["o_proj"])  # [L, n, h, d]
    np.testing.assert_allclose(
        trainable["blocks"]["attn"]["o_proj"]["m"], np.sqrt(np.sum(o_proj**2, axis=(1, 2))), rtol=1e-6
    )
    trainable = jax.tree.map(lambda x: x + 0.05, trainable)  # adapters that change the output
    tokens = np.random.default_rng(0).integers(0, 64, (2, 12)).astype(np.int32)
    positions = np.tile(np.arange(12, dtype=np.int32), (2, 1))

    def logits(trainable, base):
        params, blocks = peft.model_inputs(pe, trainable, base)
        return nnx.merge(graphdef, params)(tokens, positions, np.ones_like(tokens), blocks)

    def logits_and_grads(base):
        def loss(t):
            out = logits(t, base)
            return jnp.sum(jnp.square(out)), out

        return jax.jit(jax.grad(loss, has_aux=True))(trainable)

    assert quant.quantized(frozen["blocks"]["mlp"]["down_proj"])
    scanned_grads, scanned = logits_and_grads(frozen)
    whole_grads, whole = logits_and_grads(quant.dequantize_base(frozen))
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(whole), rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), scanned_grads, whole_grads)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return _tiny_hf_llama(tmp_path_factory.mktemp("llama") / "hf")


@pytest.mark.parametrize("method, double", [("int8", False), pytest.param("nf4", True, marks=pytest.mark.slow)])
def test_streamed_import_quantises_exactly_what_the_plain_import_holds(tiny_llama, method, double):
    pe = PeftConfig(method="lora", quantize=method, double_quant=double)
    cfg, vocab, streamed = _quantized_import(tiny_llama, pe)
    _, plain, _, _ = load(tiny_llama)
    expected = quant.quantize_base(plain, pe)

    def same(ours, theirs):  # codes bit for bit; double quantisation's means may round in another order
        ours, theirs = np.asarray(ours), np.asarray(theirs)
        if np.issubdtype(ours.dtype, np.integer) or not double:
            np.testing.assert_array_equal(ours, theirs)
        np.testing.assert_allclose(ours, theirs, rtol=1e-6)

    jax.tree.map(same, streamed, expected)
    assert streamed["embedding"].dtype == jnp.float32 and streamed["final_norm"]["scale"].dtype == jnp.float32


def test_an_orbax_base_is_quantised_after_restoring(tiny_llama, tmp_path):
    """`init_from: orbax:` (from `jaxsft convert`) gives the base the streamed Hugging Face import gives."""
    from jaxsft.infer.convert import convert
    from jaxsft.model import pretrained

    pe = PeftConfig(method="lora", quantize="nf4")
    cfg, vocab, streamed = _quantized_import(tiny_llama, pe)
    convert(f"hf:{tiny_llama}", tmp_path / "orbax")
    cfg = dataclasses.replace(cfg, init_from=f"orbax:{tmp_path / 'orbax'}")
    restored = pretrained.load_pretrained(cfg, vocab, _replicated(streamed))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored), jax.tree.map(np.asarray, streamed))


@pytest.mark.slow
def test_quantised_logits_against_the_bf16_base(tiny_llama, capsys):
    """The scan's per-layer dequantisation == the plain model on the dequantised base; the error
    of the quantised base against the bf16 base (printed; README: performance table). HF's
    random init (normal weights): NF4's ~10% weight error shows about doubled in the logits."""
    tokens = np.random.default_rng(0).integers(0, 96, (4, 24)).astype(np.int32)
    positions = np.tile(np.arange(24, dtype=np.int32), (4, 1))
    graphdef, f32_params, cfg, vocab = load(tiny_llama)
    reference = np.asarray(forward(graphdef, f32_params, tokens, positions, np.ones_like(tokens)))
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), f32_params)
    bf16_logits = np.asarray(forward(graphdef, bf16, tokens, positions, np.ones_like(tokens)))

    def error(logits, against):
        rel = np.linalg.norm(logits - against) / np.linalg.norm(against)
        return rel, np.abs(logits - against).max(), np.mean(logits.argmax(-1) == against.argmax(-1))

    def line(name, rel, worst, top1):
        return f"{name}: {rel:.4f} relative, {worst:.4f} max, top-1 {top1:.3f}"

    lines, errors = [], {}
    for method, double in (("int8", False), ("nf4", False), ("nf4", True)):
        pe = PeftConfig(method="lora", targets=("all-linear",), quantize=method, double_quant=double)
        qcfg, _, frozen = _quantized_import(tiny_llama, pe, "bfloat16")
        ours = _qlora_logits(qcfg, vocab, frozen, tokens)
        dequantized = jax.tree.map(lambda x: x.astype(jnp.float32), quant.dequantize_base(frozen))
        plain = np.asarray(forward(graphdef, dequantized, tokens, positions, np.ones_like(tokens)))
        np.testing.assert_allclose(ours, plain, rtol=1e-5, atol=1e-5)
        errors[method, double] = error(ours, bf16_logits)
        lines.append(line(method + (" + double quant" if double else ""), *errors[method, double]))
    lines.append(line("bf16 vs float32 base", *error(bf16_logits, reference)))
    with capsys.disabled():
        print("\nlogit error against the bf16 base (2-layer Llama, d 256, blocks of 64):\n  " + "\n  ".join(lines))
    assert errors["int8", False][0] < 0.02 and errors["int8", False][2] >= 0.95
    assert errors["int8", False][0] < errors["nf4", False][0] < 0.3
    assert abs(errors["nf4", True][0] - errors["nf4", False][0]) < 0.01


# ---------------------------------------------------------------------------- host memory

SCRIPT = textwrap.dedent("""
    import json, sys, tracemalloc
    import jax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from jaxsft.config import PeftConfig
    import dataclasses
    from jaxsft.model import hf, quant
    from jaxsft.model.transformer import abstract_model, abstract_params
    path = sys.argv[1]
    cfg, vocab = hf.load_config(path)
    cfg = dataclasses.replace(cfg, peft=PeftConfig(method="lora", quantize="nf4"))
    mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:1])
    layout = jax.eval_shape(lambda p: quant.quantize_base(p, cfg.peft), abstract_params(cfg, vocab))
    shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), layout)
    tracemalloc.start()
    params = hf.load_params(path, cfg, vocab, shardings)
    jax.block_until_ready(params)
    current, peak = tracemalloc.get_traced_memory()
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    print(json.dumps({"peak": peak, "model": total}))
""")


@pytest.mark.slow
def test_quantising_import_peak_host_memory_is_about_one_tensor(tmp_path):
    from test_hf_memory import CFG, OVERHEAD, VOCAB

    from jaxsft.model import hf_config
    from jaxsft.model.safetensors_io import TensorSpec, write_sharded

    shapes = paths.flatten(abstract_params(CFG, VOCAB))
    specs = [
        TensorSpec(
            name,
            hf.hf_shape(kind, shapes[path].shape[1:] if layer is not None else shapes[path].shape),
            np.dtype(np.float32),
        )
        for name, (path, kind, layer) in hf.tensor_map(CFG).items()
    ]
    rng = np.random.default_rng(0)
    by_name = {s.name: s.shape for s in specs}
    write_sharded(tmp_path, specs, lambda name: rng.standard_normal(by_name[name], np.float32), 200 * 1024**2)
    (tmp_path / "config.json").write_text(json.dumps(hf_config.to_hf(CFG, VOCAB, "float32")))
    largest = max(int(np.prod(s.shape)) * 4 for s in specs)
    full = sum(int(np.prod(s.shape)) * 4 for s in specs)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        env={"JAX_PLATFORMS": "cpu", "PATH": ""},
        check=True,
    )
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"float32 model {full / 2**20:.0f} MiB, quantised {measured['model'] / 2**20:.0f} MiB, import peak {measured['peak'] / 2**20:.0f} MiB"
    )
    # Embedding, head and norms stay float32; each kernel takes 4 bits + a float32 scale per 64.
    kernels = sum(int(np.prod(shapes[p].shape)) for p in quant.KERNEL_PATHS)
    assert measured["model"] == full - kernels * 4 + kernels // 2 + kernels // 64 * 4
    assert measured["peak"] < 2 * largest + OVERHEAD
