"""TPU pre-flight on a CPU host: the real train step compiled for a TPU topology (libtpu)."""

import pytest

from jaxsft import config as config_lib
from jaxsft.cli import main
from jaxsft.config import ConfigError
from jaxsft.model.transformer import param_count

from jaxsft.train import aot

# The TPU compiler (libtpu) comes with the `tpu` extra, which `dev` includes.
pytest.importorskip("libtpu", reason="pip install -e '.[tpu]'")

SMALL = ["model.vocab_size=512", "model.d_model=256", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=4",
         "model.head_dim=64", "model.d_ff=512", "data.max_length=256", "train.global_batch_size=8"]


@pytest.mark.parametrize("name, message", [
    ("v5x-8", "type one of v4, v5p, v5e, v6e"),
    ("v5p-6", "3 chips is not a v5p slice shape"),
    ("v5p", "expected <type>-<size>"),
])
def test_bad_topology_names_get_one_line(name, message):
    with pytest.raises(ConfigError, match=message):
        aot.topology(name)


def test_fsdp_on_v5p_holds_a_quarter_of_the_state_per_chip():
    devices, chip, chips = aot.topology("v5p-8")
    assert (len(devices), chips, chip.hbm_bytes) == (4, 4, 95 * aot.GIB)
    cfg = config_lib.load(None, SMALL + ["mesh.data=1", "mesh.fsdp=4"])
    report = aot.compile_for(cfg, devices, chip, chips)
    n = param_count(cfg.model, 512)
    assert report.params_bytes == n * 4 // 4  # float32, split four ways
    assert report.optimizer_bytes >= 2 * report.params_bytes  # Adam's two moments, also split
    assert report.argument_bytes >= report.params_bytes + report.optimizer_bytes
    assert report.fits and 0 < report.total_bytes < report.capacity_bytes
    tokens = 8 * 256
    assert report.model_flops == pytest.approx(6 * n * tokens + 12 * 2 * 4 * 64 * 256 * tokens)
    assert report.mfu_at_peak == 1.0


def test_sweep_prints_one_row_per_variant(capsys):
    args = ["compile", "--topology", "v5e-4", *[a for kv in SMALL for a in ("--set", kv)],
            "--sweep", "mesh.data=-1", "mesh.data=1,mesh.fsdp=-1,model.remat=full"]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[1].startswith("mesh.data=-1") and "75.0%" in lines[2]


def test_a_job_that_does_not_fit_says_so(capsys):
    big = ["model.vocab_size=32000", "model.d_model=2048", "model.n_layers=4", "model.n_heads=16",
           "model.n_kv_heads=16", "model.head_dim=128", "model.d_ff=8192", "data.max_length=2048",
           "train.global_batch_size=64"]
    assert main(["compile", "--topology", "v5e-4", *[a for kv in big for a in ("--set", kv)]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxsft: error: does not fit:") and "exceeds available HBM" in err, err
