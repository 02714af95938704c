"""Streaming import: host memory stays near one tensor, not the model (measured in a subprocess).

A ~300 MB float32 Llama is written tensor by tensor; a fresh process imports it with
tracemalloc on (numpy reports its buffers to tracemalloc; the device buffers, which on
CPU also live in host memory, are the result, not staging) and prints the peak.
"""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jaxsft.config import ModelConfig
from jaxsft.model import hf, hf_config, paths
from jaxsft.model.safetensors_io import TensorSpec, write_sharded
from jaxsft.model.transformer import abstract_params

CFG = ModelConfig(d_model=1024, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=128, d_ff=2816)
VOCAB = 24000
OVERHEAD = 32 * 1024**2

SCRIPT = textwrap.dedent("""
    import json, sys, tracemalloc
    import jax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from jaxsft.model import hf, hf_config
    from jaxsft.model.transformer import abstract_params
    path = sys.argv[1]
    cfg, vocab = hf.load_config(path)
    mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:1])
    shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract_params(cfg, vocab))
    tracemalloc.start()
    params = hf.load_params(path, cfg, vocab, shardings)
    jax.block_until_ready(params)
    current, peak = tracemalloc.get_traced_memory()
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    print(json.dumps({"peak": peak, "current": current, "model": total}))
""")


@pytest.mark.slow
def test_import_peak_host_memory_is_about_one_tensor(tmp_path):
    mapping = hf.tensor_map(CFG)
    shapes = paths.flatten(abstract_params(CFG, VOCAB))
    specs = [
        TensorSpec(
            name,
            hf.hf_shape(kind, shapes[path].shape[1:] if layer is not None else shapes[path].shape),
            np.dtype(np.float32),
        )
        for name, (path, kind, layer) in mapping.items()
    ]
    rng = np.random.default_rng(0)
    write_sharded(
        tmp_path,
        specs,
        lambda name: rng.standard_normal(next(s.shape for s in specs if s.name == name), np.float32),
        200 * 1024**2,
    )
    (tmp_path / "config.json").write_text(json.dumps(hf_config.to_hf(CFG, VOCAB, "float32")))
    largest = max(int(np.prod(s.shape)) * 4 for s in specs)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        env={"JAX_PLATFORMS": "cpu", "PATH": ""},
        check=True,
    )
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"model {measured['model'] / 2**20:.0f} MiB, largest tensor {largest / 2**20:.0f} MiB, "
        f"import peak {measured['peak'] / 2**20:.0f} MiB"
    )
    assert measured["model"] > 250 * 1024**2
    assert measured["peak"] < 2 * largest + OVERHEAD
