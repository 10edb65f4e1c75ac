"""benchmarks/prefill_chunk.py at a seconds scale (tiny shape): one chunk per asked position per
system, a positive time per row each (what its table rests on; never a timing comparison)."""
import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_run_times_a_chunk_at_each_position_for_each_system():
    spec = importlib.util.spec_from_file_location(
        "prefill_chunk", os.path.join(REPO, "benchmarks", "prefill_chunk.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(["--quick", "--layout", "slots"])
    assert sorted(results) == ["dms8", "full"]
    for rows in results.values():
        assert [p for p, _ in rows] == [0, 64] and all(ms > 0 for _, ms in rows)
    with pytest.raises(SystemExit, match="multiple of --chunk"):
        bench.main(["--positions", "0,50", "--chunk", "32"])
