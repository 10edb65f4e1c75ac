"""infer.py: the no-argument run, prompt sources, stats JSON against `generate`, full vs dms, a
model without a tokenizer against transformers, train.py checkpoints, and bad inputs (exit code 2
before any compute). `infer.main` runs in-process; one run goes through the script itself; the
package functions under it (dms_jax.prompts, dms_jax.output, dms_jax.train.restore) are called
directly where that is cheaper."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import dms_jax
import infer
from dms_jax.assets import TINY_MODEL_DIR
from dms_jax.output import TextStream
from dms_jax.prompts import PromptInput, read_prompts, stop_tokens
from dms_jax.prompts import read_jsonl as read_prompt_jsonl
from tests import hf_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = "The archive remembered all of it."
# shared by the short runs so that they reuse one compiled program per batch size
SMALL = ["--max-new-tokens", "8", "--max-len", "64", "--quiet"]
TIMINGS = {"prefill_seconds", "decode_seconds", "compile_seconds", "decode_tokens_per_s"}


@pytest.fixture(scope="module")
def tiny_model():
    return dms_jax.from_pretrained(TINY_MODEL_DIR), dms_jax.load_tokenizer(TINY_MODEL_DIR)


def run(capsys, *argv):
    """infer.main on the tiny random model unless argv names a model (or a train.py config)."""
    argv = [str(a) for a in argv]
    if "--model" not in argv and "--train-config" not in argv and "--help" not in argv:
        argv = ["--model", TINY_MODEL_DIR, *argv]
    return run_as_given(capsys, *argv)


def run_as_given(capsys, *argv):
    rc = infer.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def assert_stats_equal(written: dict, stats):
    """--stats-json holds every GenerateStats field (arrays as lists) with the library's values."""
    names = [f.name for f in dataclasses.fields(stats)]
    assert set(written) == set(names) | {"decode_tokens_per_s"}
    for name in names:
        value = getattr(stats, name)
        if name in TIMINGS:
            assert isinstance(written[name], float)
        elif isinstance(value, (str, int)):
            assert written[name] == value, name
        else:
            np.testing.assert_allclose(np.asarray(written[name], float), np.asarray(value, float),
                                       rtol=1e-6, err_msg=name)


def test_text_prompt_run_prints_text_and_stats_matching_generate(capsys, tmp_path, tiny_model):
    """A model whose tokenizer is not the recall tasks' gets the built-in text prompt."""
    rc, out, err = run(capsys)
    assert rc == 0, err
    text, sep, table = out.partition("\n\npolicy ")
    assert sep and text.strip(), out[:500]
    for row in ("compression ratio (seen/held)", "KV held / full cache", "overflow (tokens dropped)"):
        assert row in table
    assert "policy dms" in err and "DMS neuron window 16" in err  # the info lines (stderr)
    # one capacity figure: the input line's (the plan's) is the stats table's
    planned = re.search(r"capacity (\d+) slots/head", err).group(1)
    assert f"({planned} slots/head)" in table

    # the same prompt from a file, outputs written (same shapes: no new compile) ...
    (tmp_path / "prompt.txt").write_text(infer.DEFAULT_PROMPT)
    stats_path, rows_path = tmp_path / "stats.json", tmp_path / "rows.jsonl"
    rc, quiet_out, err = run(capsys, "--prompt-file", tmp_path / "prompt.txt", "--quiet",
                             "--stats-json", stats_path, "--output-jsonl", rows_path)
    assert rc == 0, err
    (row,) = read_jsonl(rows_path)
    assert quiet_out == row["text"] + "\n" and text == row["text"]  # streamed == decoded at the end

    # ... against the library called directly on the tokenized built-in prompt
    model, tokenizer = tiny_model
    ids = tokenizer(infer.DEFAULT_PROMPT)["input_ids"]
    assert 1000 <= len(ids) <= 2000 and row["prompt_tokens"] == len(ids)
    ref = dms_jax.generate(model, [ids], max_new_tokens=infer.DEFAULT_MAX_NEW_TOKENS,
                           stop_tokens=[tokenizer.eos_token_id], decode_segment=16)
    assert row["tokens"] == ref.sequences()[0]
    assert row["text"] == tokenizer.decode(ref.sequences()[0], skip_special_tokens=True)
    with open(stats_path) as f:
        written = json.load(f)
    assert_stats_equal(written, ref.stats)
    assert written["seen_tokens"] == [len(ids) + len(row["tokens"]) - 1]


def test_paged_layout_gives_the_slot_layouts_answer_in_a_smaller_cache(capsys, tmp_path):
    results = {}
    for layout in ("slots", "paged"):
        path, rows = tmp_path / f"{layout}.json", tmp_path / f"{layout}.jsonl"
        rc, _, err = run(capsys, "--layout", layout, "--page-size", 16, "--quiet",
                         "--stats-json", path, "--output-jsonl", rows)
        assert rc == 0, err
        with open(path) as f, open(rows) as g:
            results[layout] = json.load(f), json.loads(g.readline())
    (slots, slots_row), (pages, pages_row) = results["slots"], results["paged"]
    assert pages_row["tokens"] == slots_row["tokens"]
    assert pages["held_tokens"] == slots["held_tokens"] and pages["overflow"] == 0
    assert pages["allocated_kv_bytes"] < slots["allocated_kv_bytes"]


def test_policy_full_keeps_every_token_and_dms_compresses(capsys, tmp_path):
    results = {}
    for policy in ("full", "dms"):
        path = tmp_path / f"{policy}.json"
        rc, _, err = run(capsys, "--policy", policy, "--quiet", "--stats-json", path)
        assert rc == 0, err
        with open(path) as f:
            results[policy] = json.load(f)
    full, dms = results["full"], results["dms"]
    seen = full["seen_tokens"][0]
    assert full["policy"] == "full" and full["compression_ratio"] == 1.0 and full["overflow"] == 0
    assert np.all(np.asarray(full["held_tokens"]) == seen) and full["capacity"] >= seen
    assert dms["policy"] == "dms" and dms["seen_tokens"] == [seen]
    assert dms["compression_ratio"] > 1.5 and dms["overflow"] == 0
    assert np.all(np.asarray(dms["held_tokens"]) < seen)
    assert dms["peak_kv_bytes"] < full["peak_kv_bytes"] / 1.5
    # --strict turns the documented overflow rule into a failure (exit 1)
    rc, _, err = run(capsys, "--strict", "--quiet")
    if dms["overflow"]:
        assert rc == 1 and "KV cache overflow" in err
    else:
        assert rc == 0, err


def test_prompt_batch_and_jsonl_batch_agree(capsys, tmp_path, tiny_model):
    _, tokenizer = tiny_model
    other = "Visitors began to come back."
    with open(tmp_path / "batch.jsonl", "w") as f:
        f.write(json.dumps({"id": "text", "prompt": SHORT}) + "\n\n")
        f.write(json.dumps({"id": "ids", "input_ids": tokenizer(other)["input_ids"]}) + "\n")
    outputs = {}
    for name, source in (("prompt", ["--prompt", SHORT, "--prompt", other]),
                         ("jsonl", ["--jsonl", tmp_path / "batch.jsonl"])):
        path = tmp_path / f"{name}.out.jsonl"
        rc, out, err = run(capsys, *source, *SMALL, "--output-jsonl", path)
        assert rc == 0, err
        outputs[name] = (read_jsonl(path), out)
    rows, out = outputs["prompt"]
    assert [len(r["tokens"]) for r in rows] == [8, 8]
    assert out.count("--- [") == 2 and "--prompt #1" in out  # a batch prints each row at the end
    assert rows[0]["text"] in out and rows[1]["text"] in out
    jsonl_rows, out = outputs["jsonl"]
    assert [r["id"] for r in jsonl_rows] == ["text", "ids"]
    assert [r["tokens"] for r in jsonl_rows] == [r["tokens"] for r in rows]
    assert "line 3 of" in out  # the blank line 2 is skipped


def test_model_without_tokenizer_takes_token_ids(capsys, tmp_path, hf_model_dirs):
    model_dir = hf_model_dirs["llama"]
    rc, _, err = run(capsys, "--model", model_dir, "--prompt", "hello")
    assert rc == 2 and "no tokenizer" in err and "--prompt-ids" in err
    rc, _, err = run(capsys, "--model", model_dir, "--prompt-ids", "5,200")
    assert rc == 2 and "token id 200 is outside the model's vocabulary [0, 97)" in err
    rc, _, err = run(capsys, "--model", model_dir, "--prompt-ids", "5", "--policy", "dms")
    assert rc == 2 and "needs a DMS model" in err

    prompt = [3, 14, 15, 9, 26]
    path = tmp_path / "out.jsonl"
    rc, out, err = run(capsys, "--model", model_dir, "--prompt-ids", ",".join(map(str, prompt)),
                       "--max-new-tokens", 6, "--no-stop", "--output-jsonl", path)
    assert rc == 0, err
    (row,) = read_jsonl(path)
    torch_model = hf_models.load_torch(model_dir)  # greedy decoding in transformers, step by step
    seq = list(prompt)
    for _ in range(6):
        seq.append(int(hf_models.torch_logits(torch_model, [seq])[0, -1].argmax()))
    assert row["tokens"] == seq[len(prompt):]
    assert out.startswith(",".join(map(str, row["tokens"])) + "\n")  # ids printed, comma-separated
    assert "policy                         full" in out


def _write_checkpoint(ckpt_dir, step):
    """A train.py checkpoint of configs/tiny.py written by the trainer's own machinery, with the
    trained (adapter) parameters moved away from their zero init; returns the model it holds."""
    from dms_jax import sharding as shd
    from dms_jax.train import loop
    from dms_jax.train.checkpoint import Checkpointer
    from tests.test_train_loop import load_config_file

    config = load_config_file("tiny")
    model = loop.load_model(config.model, 0)
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    trainer = loop.build_trainer(model, mesh, loop.step_config(config), config.train, seed=0,
                                 batch_shape=(1, int(config.train.seq_len)))
    state = trainer.init_fn(trainer.trainable_params)
    keys = iter(jax.random.split(jax.random.key(1), len(state["params"])))
    state["params"] = {k: v + 0.5 * jax.random.normal(next(keys), v.shape, v.dtype)
                       for k, v in state["params"].items()}
    ckpt = Checkpointer(str(ckpt_dir), every=1, keep=3, async_save=False)
    ckpt.save(step, state, {"step": step, "data_position": step, "seed": 0, "layout": trainer.layout,
                            "data": {}})
    ckpt.close()
    return trainer.model_from(state)


def test_train_checkpoint_is_restored_over_its_base_model(capsys, tmp_path, tiny_model):
    trained = _write_checkpoint(tmp_path / "run" / "checkpoints", step=3)
    rc, _, err = run(capsys, "--model", tmp_path / "run" / "checkpoints", "--prompt", SHORT)
    assert rc == 2 and "--train-config" in err and "export" in err

    path = tmp_path / "out.jsonl"
    stats_path = tmp_path / "stats.json"
    rc, _, err = run(capsys, "--model", tmp_path / "run", "--train-config",
                     os.path.join(REPO, "configs", "tiny.py"), "--prompt", SHORT, "--max-new-tokens", 8,
                     "--output-jsonl", path, "--stats-json", stats_path)
    assert rc == 0, err
    assert "restored checkpoint step 3" in err
    _, tokenizer = tiny_model  # configs/tiny.py trains with the tiny model's tokenizer
    ref = dms_jax.generate(trained, [tokenizer(SHORT)["input_ids"]], max_new_tokens=8,
                           stop_tokens=[tokenizer.eos_token_id])
    assert read_jsonl(path)[0]["tokens"] == ref.sequences()[0]
    with open(stats_path) as f:
        written = json.load(f)
    assert_stats_equal(written, ref.stats)
    assert written["compression_ratio"] > 1.2  # the trained adapter evicts; at its zero init none

    from dms_jax.train.restore import load_for_inference, load_train_config, restore_checkpoint

    config = load_train_config(os.path.join(REPO, "configs", "tiny.py"))
    with pytest.raises(ValueError, match=r"no complete checkpoint step 4 .*\(steps found: \[3\]\)"):
        restore_checkpoint(config, str(tmp_path / "run" / "checkpoints"), 4)
    with pytest.raises(ValueError, match="needs the run's config"):
        load_for_inference(str(tmp_path / "run" / "checkpoints" / "3"))


def _blank_prompt_file(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("  \n")
    return ["--prompt-file", path]


def _bad_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "ok"}) + "\n{not json\n")
    return ["--jsonl", path]


def _messages_without_template(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    return ["--jsonl", path]


BAD = {
    "empty prompt": (["--prompt", ""], "--prompt is empty"),
    "empty prompt file": (_blank_prompt_file, "is empty"),
    "prompt longer than --max-len": (["--prompt", SHORT, "--max-len", 16], "> --max-len 16"),
    "prompt longer than the model": (["--max-new-tokens", 8000], "max_position_embeddings 8192"),
    "capacity below window + 1": (["--prompt", SHORT, "--capacity", 8],
                                  "--capacity 8 cannot hold the DMS window"),
    "budget below window + 1": (["--prompt", SHORT, "--budget", 16, "--window", 16], "window + 1 = 17"),
    "unknown policy": (["--policy", "lru"], "unknown policy 'lru'"),
    "policy-arg without =": (["--policy-arg", "recent"], "KEY=VALUE"),
    "negative window": (["--window", -1], "--window -1 must be >= 0"),
    "CR below 1": (["--target-cr", 0.5], "--target-cr 0.5 must be"),
    "top-p zero": (["--top-p", 0], "--top-p 0.0 must be in (0, 1]"),
    "top-p above 1": (["--top-p", 1.5], "--top-p 1.5"),
    "negative temperature": (["--temperature", -1], "--temperature"),
    "negative top-k": (["--top-k", -2], "--top-k -2"),
    "negative max-new-tokens": (["--max-new-tokens", -1], "--max-new-tokens -1"),
    "capacity and budget": (["--capacity", 32, "--budget", 32], "not both"),
    "paged baseline": (["--prompt", SHORT, "--layout", "paged", "--policy", "h2o", "--budget", 32],
                       "--layout paged holds --policy full and dms"),
    "token id out of range": (["--prompt-ids", "1,512"], "token id 512 is outside"),
    "token ids not integers": (["--prompt-ids", "1,x"], "not a list of integers"),
    "stop token out of range": (["--stop", 600], "token id 600 is outside"),
    "stop string of several tokens": (["--stop", "hello world"], "give a single token"),
    "two input kinds": (["--prompt", "a", "--prompt-ids", "1"], "give one kind of input"),
    "bad jsonl line": (_bad_jsonl, "line 2 of"),
    "messages without a chat template": (_messages_without_template, "no chat template"),
    "chat without a template": (["--chat", "--prompt", SHORT], "no chat template"),
    "missing model directory": (["--model", "./no/such/model"], "no such directory"),
    "stats-json in a missing directory": (["--stats-json", "/no/such/dir/s.json"], "does not exist"),
    "malformed flag": (["--max-new-tokens", "many"], "invalid int value"),
    "abbreviated flag": (["--max-new-token", 5], "unrecognized arguments: --max-new-token"),
    "infinite target-cr": (["--target-cr", "inf"], "--target-cr inf must be a finite number"),
    "nan margin": (["--margin", "nan"], "--margin nan must be a finite number >= 0"),
    "window beyond int32": (["--window", 10 ** 12], "--window 1000000000000 must be >= 0 and "),
    "cache beyond memory": (["--max-len", 10 ** 9], "the KV cache needs"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_exit_2_before_any_compute(case, capsys, tmp_path, monkeypatch):
    argv, message = BAD[case]
    argv = argv(tmp_path) if callable(argv) else argv

    def no_compute(*args, **kwargs):
        raise AssertionError("generate was called")

    monkeypatch.setattr(infer, "run_generate", no_compute)
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    assert message in err, err
    assert "Traceback" not in err


def test_baseline_policy_with_budget_and_policy_args(capsys, tmp_path, tiny_model):
    from dms_jax.policies import get_policy

    model, tokenizer = tiny_model
    stats_path, rows_path = tmp_path / "stats.json", tmp_path / "rows.jsonl"
    rc, _, err = run(capsys, "--prompt", SHORT, *SMALL, "--policy", "streaming", "--budget", 12,
                     "--policy-arg", "sinks=2", "--stats-json", stats_path, "--output-jsonl", rows_path)
    assert rc == 0, err
    ref = dms_jax.generate(model, [tokenizer(SHORT)["input_ids"]], max_new_tokens=8, max_len=64,
                           policy=get_policy("streaming", sinks=2), budget=12,
                           stop_tokens=[tokenizer.eos_token_id], decode_segment=8)
    assert read_jsonl(rows_path)[0]["tokens"] == ref.sequences()[0]
    with open(stats_path) as f:
        written = json.load(f)
    assert_stats_equal(written, ref.stats)
    assert written["policy"] == "streaming" and np.max(written["held_tokens"]) == 12

    for argv, message in ((["--policy", "h2o"], "add --budget N"),
                          (["--policy", "streaming", "--budget", 3, "--policy-arg", "sinks=4"],
                           "--policy streaming --budget 3: budget=3"),
                          (["--policy", "tova", "--budget", 12, "--policy-arg", "sinks=4"],
                           "has no parameter sinks")):
        rc, _, err = run(capsys, "--prompt", SHORT, *SMALL, *argv)
        assert rc == 2 and message in err, err


def test_policy_args_and_cache_flags_reach_the_library(capsys, monkeypatch):
    import dms_jax.policies

    seen = {}

    class Called(Exception):
        pass

    def fake_get_policy(name, **params):
        seen["get_policy"] = (name, params)
        return dms_jax.policies.DMS

    def fake_generate(model, prompts, **kwargs):
        seen.update(kwargs, prompts=prompts)
        raise Called

    monkeypatch.setattr(dms_jax.policies, "get_policy", fake_get_policy)
    monkeypatch.setattr(infer, "run_generate", fake_generate)
    with pytest.raises(Called):
        run(capsys, "--prompt-ids", "1,2,3", "--policy", "dms", "--policy-arg", "recent=32",
            "--policy-arg", "mode=fast", "--policy-arg", "ratio=0.5", "--capacity", 40,
            "--window", 12, "--margin", "0.25", "--chunk-size", 7, "--temperature", "0.7",
            "--top-k", 5, "--top-p", "0.9", "--stop", 3, "--strict", "--max-len", 50,
            "--max-new-tokens", 4)
    assert seen["get_policy"] == ("dms", {"recent": 32, "mode": "fast", "ratio": 0.5})
    assert seen["prompts"] == [[1, 2, 3]]
    expected = dict(capacity=40, window=12, margin=0.25, chunk_size=7, temperature=0.7, top_k=5,
                    top_p=0.9, stop_tokens=[3], strict=True, max_len=50, max_new_tokens=4, budget=None)
    assert {k: seen[k] for k in expected} == expected


def test_streaming_prints_whole_characters_only(tiny_model):
    _, tokenizer = tiny_model
    text = "Saltmère — ökonomisch,\n記録 kept\n\nend"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    class Sink:
        def __init__(self):
            self.parts = []

        def write(self, s):
            self.parts.append(s)

        def flush(self):
            pass

    sink = Sink()
    stream = TextStream(tokenizer, sink)
    for t in ids:
        stream.feed([t, -1])  # -1: a finished row's padding
    stream.finish()
    assert "".join(sink.parts) == text + "\n"
    assert not any("\ufffd" in p for p in sink.parts)

    sink = Sink()  # a model without a tokenizer: the ids, comma-separated
    stream = TextStream(None, sink)
    stream.feed([1, 2])
    stream.feed([-1, 3])
    stream.finish()
    assert sink.parts == ["1,2", ",3", "", "\n"]


def test_read_prompts_and_stop_tokens_without_a_model(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"input_ids": [4, 5], "id": "a", "max_new_tokens": 3}) + "\n\n"
                    + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    where = f"line 3 of {path}"
    assert list(read_prompt_jsonl(str(path))) == [
        PromptInput(f"line 1 of {path}", "ids", [4, 5], "a", 3),
        PromptInput(where, "messages", [{"role": "user", "content": "hi"}])]
    with pytest.raises(ValueError, match=re.escape(f"{where}: the model has no tokenizer")):
        read_prompts(None, jsonl=str(path))  # token ids need no tokenizer; messages do
    (prompt,) = read_prompts(None, prompt_ids=["7, 8 9"])
    assert (prompt.ids, prompt.source, prompt.text) == ([7, 8, 9], "--prompt-ids #0", None)
    for row, message in (({"input_ids": [1.5]}, "'input_ids' must be a non-empty list of integers"),
                         ({"prompt": "x", "max_new_tokens": -1}, "must be an integer >= 0"),
                         ({"text": "x"}, "has none of 'prompt', 'messages', 'input_ids'")):
        path.write_text(json.dumps(row) + "\n")
        with pytest.raises(ValueError) as err:
            read_prompts(None, jsonl=str(path))
        assert str(err.value).startswith(f"line 1 of {path}") and message in str(err.value)
    with pytest.raises(ValueError, match="give one kind of input"):
        read_prompts(None, prompt=["a"], prompt_ids=["1"])

    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [9, 2, 700]}))
    assert stop_tokens(None, None, str(tmp_path), 512) == [2, 9]  # 700: outside the vocabulary
    assert stop_tokens(["5"], None, str(tmp_path), 512) == [5]
    with pytest.raises(ValueError, match="the model has no tokenizer; give the token's id"):
        stop_tokens(["</s>"], None, None, 512)


def test_help_lists_the_flags(capsys):
    rc, out, _ = run(capsys, "--help")
    assert rc == 0
    for flag in ("--model", "--prompt-file", "--jsonl", "--chat", "--policy-arg", "--target-cr",
                 "--capacity", "--budget", "--stats-json", "--train-config"):
        assert flag in out


def test_script_entry_point_runs_the_needle_demo_with_the_shipped_8x_model():
    """The script as a user runs it, with no arguments, on a JAX-only install (torch made
    unimportable): the shipped DMS 8x model answers the built-in needle question, and no
    transformers advisory about PyTorch is printed."""
    no_torch = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
                "runpy.run_path(sys.argv[0], run_name='__main__')")
    run_ = subprocess.run([sys.executable, "-c", no_torch, os.path.join(REPO, "infer.py")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run_.returncode == 0, run_.stderr[-3000:]
    out = run_.stdout
    question = re.search(r"^question: \? (\w+)", out, re.M).group(1)
    answer = re.search(r"^answer: +(.*)$", out, re.M).group(1)
    expected = re.search(r"^expected: (\S+) +\((correct|wrong)\)", out, re.M)
    assert f" {question} {expected.group(1)} . " in " ".join(out.split())  # the printed needle
    assert answer == expected.group(1) and expected.group(2) == "correct", out[-1500:]
    cr = float(re.search(r"compression ratio \(seen/held\) +([\d.]+)x", out).group(1))
    assert cr > 4.0, out[-1500:]  # the 8x model really drops most of the prompt (5.1x measured)
    assert "policy dms" in run_.stderr and "PyTorch was not found" not in run_.stderr


def test_shipped_vanilla_model_by_name_answers_with_the_full_cache(capsys):
    rc, out, err = run_as_given(capsys, "--model", "vanilla")
    assert rc == 0, err
    assert "(correct)" in out and "policy full" in err
    assert re.search(r"compression ratio \(seen/held\) +1\.00x", out)


def test_a_missing_shipped_model_is_named_with_the_command_that_builds_it(capsys, monkeypatch, tmp_path):
    from dms_jax import assets

    monkeypatch.setitem(assets.SHIPPED_MODELS, "dms8x", str(tmp_path / "gone"))
    rc, _, err = run_as_given(capsys)
    assert rc == 2 and "scripts/build_recall_models.py" in err and "dms8x" in err


def test_zero_new_tokens_streams_nothing_and_reports_the_prefill(capsys, tiny_model):
    rc, out, err = run(capsys, "--prompt", SHORT, "--max-new-tokens", 0, "--max-len", 64)
    assert rc == 0, err
    text, sep, table = out.partition("\n\npolicy ")
    assert sep and text.strip() == ""
    assert re.search(r"decode\s+0 tok", table)
    _, tokenizer = tiny_model
    assert re.search(rf"tokens seen \(per row\)\s+{len(tokenizer(SHORT)['input_ids'])}\n", out)


def test_progress_lines_without_a_terminal_move_chunk_by_chunk(capsys, monkeypatch):
    """stderr is not a terminal here: progress comes as log lines, the prefill's one per chunk
    (LOG_EVERY_S = 0: every update is due)."""
    monkeypatch.setattr(infer, "LOG_EVERY_S", 0.0)
    rc, _, err = run(capsys, "--prompt", SHORT * 2, "--chunk-size", 16, "--max-new-tokens", 8,
                     "--max-len", 128, "--no-stream", "--no-stop")
    assert rc == 0, err
    lines = [line for line in err.splitlines() if line.startswith("prefill: ")]
    assert lines[0].startswith("prefill: compiling") and lines[1].startswith("prefill: 0/")
    done = [int(re.match(r"prefill: (\d+)/(\d+) tokens \(", line).group(1)) for line in lines[2:]]
    total = int(re.match(r"prefill: 0/(\d+)", lines[1]).group(1))
    assert done == list(range(16, total, 16)) + [total]  # one line per chunk of 16
    decode = [line for line in err.splitlines() if line.startswith("decode: ")]
    assert decode and decode[-1].startswith("decode: 8/8 tokens")
