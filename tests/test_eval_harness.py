"""The evaluation harness, the suite (`python -m dms_jax.eval`) and cache-path scoring.

* harness: each generated answer == the argmax of an independent full-sequence forward over the
  transcript (plain forward for `full`, hard-mask `eval_forward` for `dms`), so the turns are
  assembled as documented (`<s>` + context + question, then each question as a continuation with
  the model's own answers in context); the figures equal direct counts;
* suite: end to end on a tiny random Llama (vocab 340, the tasks' tokenizer) and its DMS
  retrofit: full, dms, streaming and snapkv at the DMS budget; results.json, a parseable table,
  the PNGs; bad input is refused before any model runs, naming the fix;
* scoring: `loglikelihood` through the cache == the plain forward's log-softmax (`full`) and the
  hard-mask evaluation forward's (`dms`, decisions that evict), <= 1e-4.
"""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dms_jax
from dms_jax import DMSConfig, ModelConfig
from dms_jax.eval import harness as H
from dms_jax.eval import scoring, suite
from dms_jax.eval import tasks as T
from dms_jax.eval.tokenizer import train_tokenizer
from dms_jax.policies import budget_from_stats

WINDOW = 4
LENGTH = 64
TASKS = ("niah_single", "niah_multiquery")  # one turn; two turns (a continuation)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(num_per_task=1)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer):
    """{"vanilla": dir, "dms": dir, "no_tokenizer": dir}: a tiny random Llama and its DMS
    retrofit (adapter weights random, so most tokens are flagged and evicted)."""
    root = tmp_path_factory.mktemp("eval_models")
    cfg = ModelConfig(vocab_size=340, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True)
    vanilla = dms_jax.Decoder(cfg, rngs=nnx.Rngs(0))
    dirs = {"vanilla": dms_jax.save_pretrained(vanilla, str(root / "vanilla"),
                                               tokenizer=tokenizer),
            "no_tokenizer": dms_jax.save_pretrained(vanilla, str(root / "bare"))}
    dms = dms_jax.from_pretrained(dirs["vanilla"], dms=DMSConfig(mode="adapter", window=WINDOW,
                                                                 offset=-4.0))
    rng = np.random.default_rng(0)
    for layer in dms.layers:
        k = layer.attn.dms_proj.kernel
        k[...] = jnp.asarray(0.01 * rng.standard_normal(k.shape), k.dtype)
    dirs["dms"] = dms_jax.save_pretrained(dms, str(root / "dms"), tokenizer=tokenizer)
    return dirs


@pytest.fixture(scope="module")
def models(model_dirs):
    return {k: dms_jax.from_pretrained(model_dirs[k]) for k in ("vanilla", "dms")}


def padded_forward(model, ids, policy, width=128):
    """Logits [T, V] and decisions [L, T, Hkv] (dms) of one row, right-padded to `width` so
    every row runs at one shape: the plain forward (full) or the hard-mask evaluation forward."""
    n = len(ids)
    assert n <= width
    row = np.zeros((1, width), np.int32)
    row[0, :n] = ids
    mask = (np.arange(width) < n)[None].astype(np.int32)
    out = model.forward(jnp.asarray(row), attention_mask=jnp.asarray(mask),
                        mode="plain" if policy == "full" else "eval", attention_impl="dense")
    decisions = None if out.decisions is None else np.asarray(out.decisions[:, 0, :n])
    return np.asarray(out.logits[0, :n]), decisions


def examples():
    return [ex for t in TASKS for ex in T.make_examples(t, 2, LENGTH, split="eval")]


# ----------------------------------------------------------------------------- harness


def transcript_ids(example, transcript, tokenizer):
    """The whole conversation as the model saw it, and where each answer's tokens sit."""
    turns = H.encode_turns(example, tokenizer)
    ids, spans = [], []
    for prompt, answer in zip(turns, transcript["generated_ids"]):
        ids += prompt
        spans.append((len(ids), len(answer)))
        ids += answer
    return np.asarray(ids, np.int32), spans


@pytest.mark.parametrize("policy", ["full", "dms"])
def test_answers_follow_an_independent_forward_over_the_transcript(models, tokenizer, policy):
    model = models["vanilla" if policy == "full" else "dms"]
    exs = examples()
    result = H.evaluate(model, tokenizer, exs, policy=policy, batch_size=2, progress=False)
    flagged = []
    for ex, tr in zip(exs, result.transcripts):
        ids, spans = transcript_ids(ex, tr, tokenizer)
        logits, decisions = padded_forward(model, ids, policy)
        if decisions is not None:
            flagged.append(float(decisions[:, 1:].mean()))
        for start, n in spans:
            assert n >= 1
            want = logits[start - 1:start - 1 + n].argmax(-1)
            np.testing.assert_array_equal(ids[start:start + n], want)
        assert len(tr["answers"]) == len(ex.questions)
        assert tr["score"] == T.score_example(ex, tr["answers"])
    assert len(result.transcripts[-1]["generated_ids"]) == 2  # multiquery: a continuation turn
    # figures equal direct counts
    assert result.tasks == list(TASKS)
    for task in TASKS:
        assert result.accuracy[task] == T.mean_ci95(result.scores[task])
    assert result.overflow == 0
    held = result.held_tokens  # [L, N, Hkv]
    assert held.shape == (2, len(exs), 2)
    assert result.held_tokens_per_head == pytest.approx(held.mean())
    assert result.kept_fraction.shape == (2, 2)
    seen = np.asarray([len(transcript_ids(ex, tr, tokenizer)[0]) - 1  # the last token pends
                       for ex, tr in zip(exs, result.transcripts)])
    np.testing.assert_allclose(result.kept_fraction,
                               (held / seen[None, :, None]).mean(axis=1), rtol=1e-6)
    if policy == "full":
        np.testing.assert_array_equal(held, np.broadcast_to(seen[None, :, None], held.shape))
        assert result.compression_ratio == pytest.approx(1.0)
        # every query reads every earlier key: sum over rows of T(T+1)/2 per layer and KV head
        assert result.kv_reads == pytest.approx((seen * (seen + 1) / 2).mean() * 2 * 2)
        assert result.max_peak_held == seen.max()
    else:
        assert 0.5 <= np.mean(flagged) <= 0.9, flagged  # the decisions really evict
        assert result.compression_ratio > 1.5
        assert result.max_peak_held < seen.max()
        assert H.budget_for(result) == budget_from_stats(type("S", (), {"held_tokens": held}))


def test_a_dms_cache_too_small_is_an_error_not_a_result(models, tokenizer):
    with pytest.raises(dms_jax.cache.CacheOverflowError, match="raise its capacity"):
        H.evaluate(models["dms"], tokenizer, examples()[:2], policy="dms", capacity=WINDOW + 1,
                   batch_size=2, progress=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(policy="snapkv", budget=10, policy_params={"obs_window": 16}), "budget >= 17"),
    (dict(policy="streaming", budget=3), "budget >= 5"),
    (dict(policy="h2o"), "pass budget="),
    (dict(policy="full", budget=8), "for the baselines"),
    (dict(policy="lru"), "unknown policy"),
    (dict(policy="dms", capacity=0), "positive integer"),
    (dict(policy="full", batch_size=0), "batch_size"),
    (dict(policy="full", samples=0), "samples=0"),
    (dict(policy="full", samples=2), "temperature > 0"),
    (dict(policy="full", temperature=-1.0), "temperature"),
])
def test_bad_methods_are_refused_before_compute(models, tokenizer, kwargs, match):
    with pytest.raises(H.EvalError, match=match):
        H.evaluate(models["vanilla"], tokenizer, examples()[:1], progress=False, **kwargs)


def test_majority_vote_over_sampled_conversations(models, tokenizer):
    """Each example sampled k times, each question scored on the majority answer; the cache
    figures stay per conversation and `kv_reads_per_example` counts all k."""
    exs, model = examples(), models["dms"]
    kw = dict(policy="dms", batch_size=3, progress=False)
    greedy = H.evaluate(model, tokenizer, exs, **kw)
    # at a vanishing temperature every sample is the greedy conversation, so is the vote
    cold = H.evaluate(model, tokenizer, exs, samples=3, temperature=1e-4, seed=1, **kw)
    for g, c in zip(greedy.transcripts, cold.transcripts):
        assert c["answers"] == g["answers"] and c["score"] == g["score"]
        assert c["sampled_answers"] == [g["answers"]] * 3
    assert cold.held_tokens.shape[1] == 3 * len(exs)
    assert cold.kv_reads == pytest.approx(greedy.kv_reads)
    assert cold.kv_reads_per_example == pytest.approx(3 * greedy.kv_reads_per_example)
    assert cold.compression_ratio == pytest.approx(greedy.compression_ratio)
    hot = H.evaluate(model, tokenizer, exs, samples=4, temperature=2.0, seed=2, **kw)
    again = H.evaluate(model, tokenizer, exs, samples=4, temperature=2.0, seed=2, **kw)
    assert [t["sampled_answers"] for t in hot.transcripts] == [t["sampled_answers"] for t in again.transcripts]
    for ex, t in zip(exs, hot.transcripts):
        assert len(t["sampled_answers"]) == 4
        assert t["answers"] == [H.majority(turn) for turn in zip(*t["sampled_answers"])]
        assert t["score"] == T.score_example(ex, t["answers"])
    assert any(len({tuple(s) for s in t["sampled_answers"]}) > 1 for t in hot.transcripts)


def test_majority_prefers_the_first_sampled_of_equal_counts():
    assert H.majority(["b", "a", "a", "c"]) == "a"
    assert H.majority(["b", "a", "a", "b", "c"]) == "b"
    assert H.majority(["x"]) == "x"


def test_dms_policy_needs_a_dms_model(models, tokenizer):
    with pytest.raises(H.EvalError, match="needs a DMS model"):
        H.evaluate(models["vanilla"], tokenizer, examples()[:1], policy="dms", progress=False)


def test_perfect_transcript_scores_one():
    for ex in examples():
        assert T.score_example(ex, [" ".join(a) + " ." for a in ex.answers]) == 1.0


# ----------------------------------------------------------------------------- suite


def parse_table(md: str):
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1].strip("|").split("|")) == {"---"}
    rows = [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]
    assert all(len(r) == len(head) for r in rows)
    return head, rows


def test_suite_end_to_end(model_dirs, tmp_path, capsys):
    out = tmp_path / "results"
    argv = ["--vanilla", model_dirs["vanilla"], "--dms", f"2x={model_dirs['dms']}",
            "--tasks", ",".join(TASKS), "--length", str(LENGTH), "--examples", "2",
            "--batch-size", "2", "--out", str(out), "--baselines", "streaming"]
    assert suite.main(argv) == 0
    printed = capsys.readouterr().out
    for name in ("results.json", "results.md", "pareto.png", "reads.png", "heatmap.png"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert results["complete"]
    methods = {m["method"]: m for m in results["methods"]}
    assert list(methods) == ["full", "dms 2x", "streaming @ 2x"]
    assert all(m["overflow"] == 0 for m in methods.values())
    dms = methods["dms 2x"]
    budget = int(round(np.mean(dms["held_tokens_per_head"])))
    assert methods["streaming @ 2x"]["budget"] == budget
    assert methods["streaming @ 2x"]["held_tokens_per_head"] == budget
    assert methods["full"]["compression_ratio"] == pytest.approx(1.0)
    assert dms["compression_ratio"] > 1.5
    assert np.asarray(dms["kept_fraction"]).shape == (2, 2)
    assert results["examples"]["niah_single"]["seeds"] == [0, 1]
    for m in methods.values():
        assert len(m["transcripts"]) == 2 * len(TASKS)

    md = (out / "results.md").read_text()
    head, rows = parse_table(md)
    assert head[:3] == ["method", "CR", "held tok/head"] and head[3:5] == list(TASKS)
    assert [r["method"] for r in rows] == list(methods)
    for r in rows:
        m = methods[r["method"]]
        assert r["CR"] == f"{m['compression_ratio']:.2f}x"
        assert float(r["niah_single"]) == pytest.approx(100 * m["accuracy"]["niah_single"][0],
                                                        abs=0.051)
        assert r["overflow"] == "0"
    assert "python -m dms_jax.eval --vanilla" in md
    assert "| method |" in printed


def test_suite_bad_input_is_refused_before_any_model_runs(model_dirs, tmp_path, capsys):
    base = ["--vanilla", model_dirs["vanilla"], "--dms", f"8x={model_dirs['dms']}",
            "--out", str(tmp_path / "r"), "--examples", "1"]

    def refused(extra, match, argv=None):
        with pytest.raises((suite.SuiteError, T.TaskError), match=match):
            suite.prepare(suite.parse_args((base if argv is None else argv) + extra))

    refused(["--tasks", "niah_single,needle"], "unknown task 'needle'")
    refused(["--tasks", "cwe", "--length", "12"], r"--length 12: cwe: ")
    refused(["--tasks", "vt", "--length", "20"], r"use length >= \d+")
    refused(["--capacity", "4x=64"], "no --dms model is labelled '4x'")
    refused(["--baselines", "lru"], "unknown baseline 'lru'")
    refused(["--snapkv-window", "0"], "obs_window")
    refused([], "no tokenizer", argv=["--vanilla", model_dirs["no_tokenizer"]])
    refused([], "not a DMS model", argv=["--dms", f"8x={model_dirs['vanilla']}",
                                         "--baselines", "none"])
    refused([], "no such directory", argv=["--vanilla", str(tmp_path / "missing")])
    refused([], "pass --vanilla", argv=["--dms", f"8x={model_dirs['dms']}"])
    # a budget below a baseline's minimum (checked once the DMS runs measured it)
    config = suite.parse_args(base + ["--snapkv-window", "16"])
    with pytest.raises(suite.SuiteError, match="snapkv at the held-token budget of dms 8x.*"
                                               "budget >= 17.*--snapkv-window"):
        suite.check_baseline_budgets(config, {"8x": 12})
    # the command line reports the error and exits 2, writing nothing
    assert suite.main(base + ["--tasks", "bogus"]) == 2
    assert "unknown task 'bogus'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- scoring


def reference_logprobs(logits, ids, context_len):
    """Continuation log-probabilities from full-sequence logits [T, V] (float64)."""
    logits = np.asarray(logits, np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    pos = np.arange(context_len - 1, len(ids) - 1)
    return logp[pos, ids[context_len:]], logits[pos].argmax(-1) == ids[context_len:]


def scoring_requests():
    rng = np.random.default_rng(3)
    return [(rng.integers(0, 340, n), rng.integers(0, 340, k))
            for n, k in ((21, 5), (9, 3), (30, 1))]


@pytest.mark.parametrize("policy", ["full", "dms"])
def test_loglikelihood_through_the_cache_equals_the_full_sequence_forward(models, policy):
    model = models["vanilla" if policy == "full" else "dms"]
    requests = scoring_requests()
    got = scoring.token_logprobs(model, requests, policy=policy, chunk_size=8)
    summed = scoring.loglikelihood(model, requests, policy=policy, chunk_size=8)
    for (ctx, cont), (lp, greedy), (total, is_greedy) in zip(requests, got, summed):
        ids = np.concatenate([ctx, cont]).astype(np.int32)
        logits, decisions = padded_forward(model, ids, policy)
        if decisions is not None:
            assert 0.5 <= float(decisions[:, 1:].mean()) <= 0.9  # most tokens are evicted
        want, want_greedy = reference_logprobs(logits, ids, len(ctx))
        np.testing.assert_allclose(lp, want, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(greedy, want_greedy)
        assert total == pytest.approx(want.sum(), abs=1e-4)
        assert is_greedy == bool(want_greedy.all())


def test_loglikelihood_text_and_bad_requests(models, tokenizer):
    model = models["vanilla"]
    texts = [("key Bamo is 12 . ? Bamo", "12 ."), ("", "key"),
             ("list pus bige pus ruvov . ? common", "pus bige .")]
    ids = [(tokenizer(c)["input_ids"] if c else [tokenizer.bos_token_id],
            tokenizer(x, add_special_tokens=False)["input_ids"]) for c, x in texts]
    assert ids[0] == ([tokenizer.bos_token_id] + tokenizer.convert_tokens_to_ids(
        "key Bamo is 12 . ? Bamo".split()), tokenizer.convert_tokens_to_ids(["12", "."]))
    # 3 requests, chunk 8, rows under 64 tokens: the programs of the test above are reused
    want = scoring.loglikelihood(model, ids, chunk_size=8)
    got = scoring.loglikelihood_text(model, tokenizer, texts, chunk_size=8)
    assert got == want
    with pytest.raises(ValueError, match="empty continuation"):
        scoring.loglikelihood(model, [([1, 2], [])])
    with pytest.raises(ValueError, match="empty context"):
        scoring.loglikelihood(model, [([], [5])])
    with pytest.raises(ValueError, match=r"must lie in \[0, 340\)"):
        scoring.loglikelihood(model, [([1, 2], [400])])


def test_hyperscaling_script_quick(model_dirs, tmp_path, capsys):
    """scripts/hyperscaling.py --quick on the tiny models: the table, the figures and the plot;
    maj@k rows follow the sampled transcripts' votes."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "scripts"))
    import hyperscaling

    out = tmp_path / "hs"
    assert hyperscaling.main(["--vanilla", model_dirs["vanilla"], "--dms", model_dirs["dms"],
                              "--quick", "--length", str(LENGTH), "--out", str(out)]) == 0
    head, rows = parse_table((out / "results.md").read_text())
    assert [r["method"] for r in rows][-2:] == ["DMS, one sample", "DMS, maj@2"]
    figures = json.loads((out / "results.json").read_text())
    assert figures["samples"] == 2 and len(figures["maj_at_k"]) == 2
    sampled = figures["dms_sampled"]
    assert figures["maj_at_k"][1]["kv_reads_per_example"] == pytest.approx(
        sampled["kv_reads_per_example"])
    assert float(rows[0]["/ vanilla"]) == 1.0
    assert (out / "accuracy_vs_reads.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="temperature"):
        hyperscaling.main(["--temperature", "0", "--out", str(out)])
