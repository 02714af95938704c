"""`jaxsft synth` on a tiny trained run: teacher-forced scores, reproducible sampling, resume,
provenance, the CLI."""

import json
from collections import Counter

import jax
import numpy as np
import pytest
from flax import nnx

from jaxsft.cli import main
from jaxsft.config import ConfigError
from jaxsft.data import synthetic
from jaxsft.data.formats import parse_record
from jaxsft.infer.sampler import Sampling
from jaxsft.synth import filters, generate, likelihood, records
from jaxsft.synth.filters import Length, Rank, Verify

SAMPLING = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=12, seed=3)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic.generate(7, 5, "eval")))
    return path


def _settings(run, prompts, out, **kw):
    base = dict(samples=3, sampling=SAMPLING, steps=(Length(min_tokens=0, finished=False),), batch_size=6)
    return generate.Settings(str(run), str(prompts), str(out), **{**base, **kw})


def _lines(path):
    return path.read_text().splitlines()


def test_mean_logprob_equals_a_direct_teacher_forced_computation(synth_run, prompts_file):
    synth = generate.Synthesizer(_settings(synth_run, prompts_file, "unused"))
    prompts = [synth.prompt_ids(p) for p in records.read_prompts(prompts_file)[:3]]
    responses = [[5, 9, 11, 3], [7], []]
    got = likelihood.mean_logprobs(synth.model.graphdef, synth.model.params, prompts, responses, rows=4)
    model = nnx.merge(synth.model.graphdef, synth.model.params)
    for prompt, response, score in zip(prompts, responses, got):
        if not response:
            assert score is None
            continue
        tokens = np.array([prompt + response], np.int32)
        positions = np.arange(tokens.shape[1], dtype=np.int32)[None]
        logp = np.asarray(jax.nn.log_softmax(model(tokens, positions, np.ones_like(tokens)), axis=-1), np.float64)
        direct = np.mean([logp[0, len(prompt) + j - 1, t] for j, t in enumerate(response)])
        assert score == pytest.approx(direct, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_sampling_is_reproducible_and_follows_the_seed(synth_run, prompts_file, tmp_path):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    generate.run(_settings(synth_run, prompts_file, a), progress=False)
    generate.run(_settings(synth_run, prompts_file, b), progress=False)
    assert _lines(a) == _lines(b) and len(_lines(a)) == 7 * 3
    other = Sampling(**{**SAMPLING.__dict__, "seed": 4})
    generate.run(_settings(synth_run, prompts_file, c, sampling=other), progress=False)
    texts = lambda p: [json.loads(line)["messages"][-1]["content"] for line in _lines(p)]  # noqa: E731
    assert texts(c) != texts(a)


def test_resume_skips_what_is_written_and_ends_where_an_uninterrupted_run_does(
    synth_run, prompts_file, tmp_path, monkeypatch
):
    whole = tmp_path / "whole.jsonl"
    generate.run(_settings(synth_run, prompts_file, whole), progress=False)
    # An interrupted run: prompts 1-3 finished, prompt 4's records written but not its ledger
    # line, and a record cut short.
    out = tmp_path / "out.jsonl"
    ledger = tmp_path / "out.jsonl.progress.jsonl"
    out.write_text("\n".join(_lines(whole)[:12]) + "\n" + _lines(whole)[12][:25])
    ledger.write_text("\n".join(_lines(tmp_path / "whole.jsonl.progress.jsonl")[:4]) + "\n")
    generated = []
    real = generate.Synthesizer.samples
    monkeypatch.setattr(
        generate.Synthesizer, "samples", lambda self, chunk, i, rows: generated.append(i) or real(self, chunk, i, rows)
    )
    totals = generate.run(_settings(synth_run, prompts_file, out), progress=False)
    assert generated == [1, 2, 3]  # 2 prompts a chunk: chunk 0 (prompts 1-2) was done
    assert _lines(out) == _lines(whole) and totals["prompts"] == 7 and totals["generated"] == 21
    # Finished: a third invocation loads nothing.
    monkeypatch.setattr(generate.runs, "load", lambda *a: pytest.fail("loaded a model with nothing to do"))
    assert generate.run(_settings(synth_run, prompts_file, out), progress=False) == totals
    with pytest.raises(ConfigError, match=r"another synth command .*use another --out"):
        generate.run(_settings(synth_run, prompts_file, out, samples=2), progress=False)


def test_filters_count_every_drop_and_records_carry_provenance(synth_run, prompts_file, tmp_path):
    # The tiny model answers few prompts right: a checker that takes any non-blank answer
    # (reference_regex, no reference) keeps this test about the chain, not the model.
    lenient = tmp_path / "lenient.jsonl"
    rows = [json.loads(line) for line in _lines(prompts_file)]
    lenient.write_text(
        "".join(json.dumps({**r, "messages": r["messages"][:-1], "reference_regex": r"\S"}) + "\n" for r in rows)
    )
    out = tmp_path / "ranked.jsonl"
    steps = (Verify(), Rank(keep=1))
    totals = generate.run(_settings(synth_run, lenient, out, samples=4, steps=steps), progress=False)
    assert totals["generated"] == 28 and totals["kept"] + sum(totals["dropped"].values()) == 28
    assert set(totals["dropped"]) <= {"verify_failed", "ranked_out"} and totals["dropped"]["ranked_out"] > 0
    kept = [json.loads(line) for line in _lines(out)]
    assert 0 < len(kept) == totals["kept"] <= 7
    for record in kept:
        p = record["provenance"]
        assert p["step"] == 20 and p["source"] == str(synth_run) and p["sampling"]["seed"] == 3
        assert p["results"]["verify"] is True and p["results"]["rank"] == 1 and p["filters"] == ["verify", "rank"]


def test_cli_writes_training_ready_records(synth_run, prompts_file, tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    args = ["synth", str(synth_run), "--prompts", str(prompts_file), "--out", str(out), "--samples", "2"]
    args += ["--max-new-tokens", "12", "--filter", "length:min_tokens=0,finished=false", "--filter", "dedup"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"{out}: 7 prompts, kept" in err
    for line in _lines(out):
        record = json.loads(line)
        conversation = parse_record(record, "messages")
        assert conversation[-1].role == "assistant" and record["task"] and record["provenance"]["prompt_line"]
    assert (
        main(
            [
                "synth",
                str(synth_run),
                "--prompts",
                str(prompts_file),
                "--out",
                str(tmp_path / "x.jsonl"),
                "--temperature",
                "0",
            ]
        )
        == 2
    )
    assert "copies of one greedy answer" in capsys.readouterr().err


def test_bad_prompt_lines_name_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi"}\n{"messages": [{"role": "user", "content": 3}]}\n')
    with pytest.raises(Exception, match=r"p.jsonl:2: messages\[0\] needs a role"):
        records.read_prompts(path)
    path.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    (prompt,) = records.read_prompts(path)
    assert prompt.reference == "b" and [m.role for m in prompt.messages] == ["user"]
    assert filters.parse([]) == ()


def test_output_refuses_files_it_cannot_resume(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"messages": []}\n')
    with pytest.raises(ConfigError, match="not a synth output"):
        records.Output(data, {"samples": 2})
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    first, second = records.read_prompts(prompts)
    out = records.Output(tmp_path / "out.jsonl", {"samples": 2})
    out.write(first, [records.output_record(first, "x", {"prompt_line": 1})], 2, Counter(too_long=1))
    assert records.Output(tmp_path / "out.jsonl", {"samples": 2}).totals() == {
        "prompts": 1,
        "generated": 2,
        "kept": 1,
        "dropped": {"too_long": 1},
    }
    (tmp_path / "out.jsonl").write_text("")  # the records of a finished prompt are gone
    with pytest.raises(ConfigError, match="lacks records"):
        records.Output(tmp_path / "out.jsonl", {"samples": 2})
    prompts.write_text('{"prompt": "changed"}\n{"prompt": "b"}\n')
    (tmp_path / "out2.jsonl.progress.jsonl").write_text(
        json.dumps({"header": {}})
        + "\n"
        + json.dumps({"line": 1, "sha": first.sha, "generated": 1, "kept": 0, "dropped": {}})
        + "\n"
    )
    with pytest.raises(ConfigError, match="prompt line 1 changed"):
        records.Output(tmp_path / "out2.jsonl", {}).check_unchanged(records.read_prompts(prompts))
