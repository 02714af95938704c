"""One sample per scored prompt, and the tallies of their scores by group.

Contract:
    sample_of(item, answer, strip_thinking) -> {"source", "where", "task", "split", "prompt", "reference",
                                                "output", "scores", ...}
        a prompt too long to answer (answer None): "output" and "scores" None, "skipped": "prompt_too_long";
        strip_thinking: the scores are of the text after the output's last `</think>`
        (metrics.final_answer), kept as "answer" when it differs from "output"
    generation_report(samples) -> {"overall", "by_source", "by_task", "by_split"}: each {"answers", metric: tally}

Shared by `jaxsft eval` (evaluate.py) and the eval during training (during_training.py).
"""

from __future__ import annotations

from jaxsft.eval import generation, metrics, records


def sample_of(item: records.Item, answer: generation.Answer | None, strip_thinking: bool = True) -> dict:
    sample = {
        "source": item.source,
        "where": item.where,
        "task": item.task,
        "split": item.split,
        "prompt": [{"role": m.role, "content": m.content} for m in item.prompt],
        "reference": item.reference,
    }
    if answer is None:
        return {**sample, "output": None, "scores": None, "skipped": "prompt_too_long"}
    scored = metrics.final_answer(answer.text) if strip_thinking else answer.text
    return {
        **sample,
        "output": answer.text,
        **({"answer": scored} if scored != answer.text else {}),
        "scores": metrics.score(scored, item.reference, item.regex),
        "stopped": answer.stopped,
        "prompt_tokens": answer.prompt_tokens,
        "new_tokens": answer.new_tokens,
    }


def generation_report(samples: list[dict]) -> dict:
    scored = [s for s in samples if s["scores"] is not None]

    def tally(keep) -> dict:
        chosen = [s["scores"] for s in scored if keep(s)]
        return {"answers": len(chosen), **metrics.tally(chosen)}

    return {
        "overall": tally(lambda s: True),
        "by_source": {n: tally(lambda s, n=n: s["source"] == n) for n in dict.fromkeys(s["source"] for s in scored)},
        "by_task": {t: tally(lambda s, t=t: s["task"] == t) for t in sorted({s["task"] for s in scored} - {""})},
        "by_split": {
            p: tally(lambda s, p=p: s.get("split", "") == p)
            for p in sorted({s.get("split", "") for s in scored} - {""})
        },
    }
