"""bench.py --shape tiny: the whole study on the CPU in under a minute, batched well ahead of
one-at-a-time decoding, and its CSV written."""
import time

import bench
import common


def test_bench_tiny_runs_fast_and_batching_pays(tmp_path):
    out = tmp_path / "bench.csv"
    start = time.perf_counter()
    result = bench.main(bench.parse_args(["--shape", "tiny", "--device", "cpu", "--out", str(out)]))
    assert time.perf_counter() - start < 60
    assert result["a_batched_speedup"] >= 3
    assert result["a_grid_decodes"] > 1000  # the whole grid ran: conditions x draws x swaps x configs
    saved = common.load_csv(out)
    assert len(saved) == 1 and saved.device.iloc[0].startswith("CPU")
    assert saved.a_batched_speedup.iloc[0] == result["a_batched_speedup"]
