"""GPU pre-flight on a CPU host: the real train step compiled for compile-only H100s (CUDA PJRT plugin)."""

import pytest

from jaxsft import config_load
from jaxsft.cli import main
from jaxsft.config import ConfigError
from jaxsft.model.transformer import param_count
from jaxsft.train import aot

# The CUDA PJRT plugin (no CUDA libraries) comes with the `gpu-aot` extra, which `dev` includes.
pytest.importorskip("jax_plugins.xla_cuda12", reason="pip install -e '.[gpu-aot]'")

SMALL = [
    "model.vocab_size=512",
    "model.d_model=256",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=4",
    "model.head_dim=64",
    "model.d_ff=512",
    "data.max_length=256",
    "train.global_batch_size=16",
]


@pytest.mark.parametrize(
    "name, hosts, message",
    [
        ("a100x8", 1, "gpu one of h100"),
        ("h100", 1, "expected <gpu>x<GPUs per host>"),
        ("h100x8", 0, "at least one host"),
    ],
)
def test_bad_gpu_names_get_one_line(name, hosts, message):
    with pytest.raises(ConfigError, match=message):
        aot.gpu_topology(name, hosts)


@pytest.mark.slow  # tens of seconds (pre-flight compiles, trainer runs): `pytest -m slow`
@pytest.mark.parametrize("hosts", [1, 2])
def test_fsdp_over_h100_hosts_splits_the_state(hosts):
    devices, chip, gpus = aot.gpu_topology("h100x8", hosts)
    assert (len(devices), gpus) == (8 * hosts, 8 * hosts)
    assert {d.device_kind for d in devices} == {"NVIDIA H100 80GB HBM3"} and chip.hbm_bytes == 84942979072
    cfg = config_load.load(None, SMALL + ["mesh.data=1", "mesh.fsdp=-1"])
    report = aot.compile_for(cfg, devices, chip, gpus)
    n = param_count(cfg.model, 512)
    assert report.params_bytes == n * 4 // (8 * hosts)  # float32, split over every GPU
    assert 2 * report.params_bytes <= report.optimizer_bytes <= 2 * report.params_bytes + 64
    assert report.argument_bytes >= report.params_bytes + report.optimizer_bytes
    assert report.fits and 0 < report.total_bytes < report.capacity_bytes == 84942979072
    assert report.model_flops == pytest.approx(6 * n * 16 * 256 + 12 * 2 * 4 * 64 * 256 * 16 * 256)


@pytest.mark.slow  # tens of seconds (pre-flight compiles, trainer runs): `pytest -m slow`
def test_cli_says_when_a_job_does_not_fit_on_the_gpus(capsys):
    big = [
        "model.vocab_size=32000",
        "model.d_model=4096",
        "model.n_layers=8",
        "model.n_heads=32",
        "model.n_kv_heads=32",
        "model.head_dim=128",
        "model.d_ff=14336",
        "data.max_length=4096",
        "train.global_batch_size=64",
        "mesh.data=-1",
    ]
    assert main(["compile", "--gpu", "h100x8", *[a for kv in big for a in ("--set", kv)]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxsft: error: does not fit: needs") and "GiB of 79.1 GiB per device on 1 x h100x8" in err
