"""TPU pre-flight on a CPU host: the real train step compiled for a TPU topology (libtpu)."""

import pytest

from jaxsft import config_load
from jaxsft.cli import main
from jaxsft.config import ConfigError
from jaxsft.model.transformer import param_count
from jaxsft.train import aot

# The TPU compiler (libtpu) comes with the `tpu` extra, which `dev` includes.
pytest.importorskip("libtpu", reason="pip install -e '.[tpu]'")

SMALL = [
    "model.vocab_size=512",
    "model.d_model=256",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=4",
    "model.head_dim=64",
    "model.d_ff=512",
    "data.max_length=256",
    "train.global_batch_size=8",
]


@pytest.mark.parametrize(
    "name, message",
    [
        ("v5x-8", "type one of v4, v5p, v5e, v6e"),
        ("v5p-6", "3 chips is not a v5p slice shape"),
        ("v5p", "expected <type>-<size>"),
    ],
)
def test_bad_topology_names_get_one_line(name, message):
    with pytest.raises(ConfigError, match=message):
        aot.topology(name)


@pytest.mark.slow  # tens of seconds (pre-flight compiles, trainer runs): `pytest -m slow`
def test_fsdp_on_v5p_holds_a_quarter_of_the_state_per_chip():
    devices, chip, chips = aot.topology("v5p-8")
    assert (len(devices), chips, chip.hbm_bytes) == (4, 4, 95 * aot.GIB)
    cfg = config_load.load(None, SMALL + ["mesh.data=1", "mesh.fsdp=4"])
    report = aot.compile_for(cfg, devices, chip, chips)
    n = param_count(cfg.model, 512)
    assert report.params_bytes == n * 4 // 4  # float32, split four ways
    assert report.optimizer_bytes >= 2 * report.params_bytes  # Adam's two moments, also split
    assert report.argument_bytes >= report.params_bytes + report.optimizer_bytes
    assert report.fits and 0 < report.total_bytes < report.capacity_bytes
    tokens = 8 * 256
    assert report.model_flops == pytest.approx(6 * n * tokens + 12 * 2 * 4 * 64 * 256 * tokens)
    assert report.mfu_at_peak == 1.0


@pytest.mark.slow  # tens of seconds (pre-flight compiles, trainer runs): `pytest -m slow`
def test_sweep_prints_one_row_per_variant(capsys):
    args = [
        "compile",
        "--topology",
        "v5e-4",
        *[a for kv in SMALL for a in ("--set", kv)],
        "--sweep",
        "mesh.data=-1",
        "mesh.data=1,mesh.fsdp=-1,model.remat=full",
    ]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[1].startswith("mesh.data=-1") and "75.0%" in lines[2]


def test_a_job_that_does_not_fit_says_so(capsys):
    big = [
        "model.vocab_size=32000",
        "model.d_model=2048",
        "model.n_layers=4",
        "model.n_heads=16",
        "model.n_kv_heads=16",
        "model.head_dim=128",
        "model.d_ff=8192",
        "data.max_length=2048",
        "train.global_batch_size=64",
    ]
    assert main(["compile", "--topology", "v5e-4", *[a for kv in big for a in ("--set", kv)]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxsft: error: does not fit:") and "exceeds available HBM" in err, err


@pytest.mark.slow  # tens of seconds (pre-flight compiles, trainer runs): `pytest -m slow`
def test_lora_pre_flight_counts_the_frozen_base_and_adapter_only_moments():
    """`jaxsft compile` with model.peft: the frozen base is an argument, moments cover the adapters only."""
    devices, chip, chips = aot.topology("v5p-8")
    full = aot.compile_for(config_load.load(None, SMALL + ["mesh.data=1", "mesh.fsdp=4"]), devices, chip, chips)
    cfg = config_load.load(
        None,
        SMALL
        + [
            "mesh.data=1",
            "mesh.fsdp=4",
            "model.peft.method=lora",
            "model.peft.rank=8",
            "model.peft.targets=[all-linear]",
        ],
    )
    report = aot.compile_for(cfg, devices, chip, chips)
    # 2 layers of A and B (rank 8, float32): q,k,v,o 256->256, gate,up 256->512, down 512->256.
    total = 2 * 8 * (4 * (256 + 256) + 2 * (256 + 512) + (512 + 256)) * 4
    adapters = report.params_bytes - full.params_bytes  # per chip: only the embed-axis halves split
    assert total // 4 < adapters < total
    assert 2 * adapters <= report.optimizer_bytes <= 2 * adapters + 64
    assert report.argument_bytes < full.argument_bytes
    tokens = 8 * 256
    n = param_count(cfg.model, 512)
    assert report.model_flops == pytest.approx(4 * n * tokens + 12 * 2 * 4 * 64 * 256 * tokens)


@pytest.mark.slow
def test_host_offload_remat_moves_saved_activations_out_of_hbm():
    """remat=offload keeps the same matmul outputs as dots_with_no_batch_dims_saveable, in host memory."""
    devices, chip, chips = aot.topology("v5p-8")
    shape = [
        "model.vocab_size=512",
        "model.d_model=256",
        "model.n_layers=4",
        "model.n_heads=4",
        "model.n_kv_heads=4",
        "model.head_dim=64",
        "model.d_ff=1024",
        "data.max_length=1024",
        "train.global_batch_size=16",
        "mesh.data=1",
        "mesh.fsdp=4",
    ]
    temp = {
        remat: aot.compile_for(
            config_load.load(None, shape + [f"model.remat={remat}"]), devices, chip, chips
        ).temp_bytes
        for remat in ("none", "dots_with_no_batch_dims_saveable", "offload", "full")
    }
    # Measured (MiB per chip): none 913, dots_with_no_batch_dims_saveable 432, offload 230, full 158.
    # The policies find the projections by their name (model/dense.py): their dots sit in a custom VJP.
    assert temp["full"] < temp["offload"] < 0.7 * temp["dots_with_no_batch_dims_saveable"] < temp["none"]
