"""bench.py --shape tiny: the whole study runs on the CPU and its CSV row is written. Speed itself
is bench.py's output, never a test assertion (timings fail on a loaded machine)."""
import bench
import runs


def test_bench_tiny_runs_and_writes_its_row(tmp_path):
    out = tmp_path / "bench.csv"
    result = bench.main(bench.parse_args(["--shape", "tiny", "--device", "cpu", "--out", str(out)]))
    assert result["a_grid_decodes"] > 1000  # the whole grid ran: conditions x draws x swaps x configs
    saved = runs.load_csv(out)
    assert len(saved) == 1 and saved.device.iloc[0].startswith("CPU")
    assert saved.a_batched_speedup.iloc[0] == result["a_batched_speedup"]
