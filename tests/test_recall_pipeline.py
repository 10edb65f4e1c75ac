"""The proof's pipeline at tiny sizes: tokenizer, corpora, pretraining, a DMS retrofit exported at
2x / 4x / 8x, and the evaluation against the baselines, end to end in one process; a rerun
skips the finished stages; a stage whose inputs are missing names the stage to run first."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import build_recall_models as pipeline  # noqa: E402


@pytest.mark.slow
def test_tiny_pipeline_builds_every_artefact_and_resumes(tmp_path, capsys):
    out = str(tmp_path / "recall")
    assert pipeline.main(["--preset", "tiny", "--out", out]) == 0
    for name in ("tokenizer/tokenizer.json", "data/pretrain.jsonl", "data/retrofit.jsonl",
                 "vanilla/config.json", "dms2x/config.json", "dms4x/config.json", "dms8x/config.json",
                 "eval/results.json", "eval/results.md", "eval/pareto.png", "eval/reads.png",
                 "eval/heatmap.png", "timings.json"):
        assert os.path.exists(os.path.join(out, name)), name
    # the retrofit legs follow one schedule: later exports record higher reached ratios
    crs = [json.load(open(os.path.join(out, f"dms{r}x", "config.json")))["dms"]["target_cr"]
           for r in (2, 4, 8)]
    assert crs == sorted(crs)
    results = json.load(open(os.path.join(out, "eval", "results.json")))
    assert [m["method"] for m in results["methods"]] == ["full", "dms 8x", "streaming @ 8x"]
    assert results["complete"]
    # infer.py on a recall model with no input asks the built-in needle question
    import infer

    assert infer.main(["--model", os.path.join(out, "dms8x"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "question: ? " in printed and "expected: " in printed and "answer: " in printed
    # a rerun finds every stage done and changes nothing
    before = os.path.getmtime(os.path.join(out, "dms8x", "config.json"))
    assert pipeline.main(["--preset", "tiny", "--out", out, "--stages", "tokenizer,corpus,pretrain,retrofit"]) == 0
    assert os.path.getmtime(os.path.join(out, "dms8x", "config.json")) == before


def test_a_stage_without_its_inputs_names_the_stage_to_run(tmp_path, capsys):
    assert pipeline.main(["--preset", "tiny", "--out", str(tmp_path), "--stages", "retrofit"]) == 1
    assert "run --stages pretrain first" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pipeline.main(["--stages", "pretrian"])
