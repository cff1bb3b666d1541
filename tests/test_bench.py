"""bench.py on the tiny shape: each part prints and appends its row the moment it ends, a failing
part becomes a row and the next part runs, the CSV keeps one schema. Speed itself is bench.py's
output, never a test assertion (timings fail on a loaded machine)."""
import math

import pytest

import bench
from zcausal import cost, runs


def _args(tmp_path, *extra):
    return bench.parse_args(["--shape", "tiny", "--device", "cpu", "--out", str(tmp_path / "bench.csv"),
                             *extra])


def test_a_row_is_printed_and_written_before_any_other_part_runs(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench.csv"
    seen = {}

    def next_part(ctx, workdir):  # stands in for the step part: what exists when it starts?
        seen["printed"] = capsys.readouterr().out
        seen["rows"] = runs.load_csv(out)
        return dict(seconds=0.0, note="stand-in")

    monkeypatch.setattr(bench, "part_step", next_part)
    rows = bench.main(_args(tmp_path, "--parts", "a", "step", "--limit", "4"))
    assert "[bench] a: " in seen["printed"] and "[bench] step" not in seen["printed"]
    assert "what the direct template needs" in seen["printed"]  # new tokens are reported
    first = seen["rows"]
    assert list(first.part) == ["a"] and first.status.iloc[0] == "ok"
    a = rows[0]
    # 4 problems x (none + 2 layers x 2 pairings x (2 ks x 4 configurations x (z, zperp, 2 x 2
    # random draws) + 4 full)) = 836 unique decodes today; more if exp_a gains conditions
    assert a["decodes"] >= 836
    assert a["new_tokens"] == bench.direct_new_tokens(bench.problems.load_prompts()["pairs"][:4])
    assert 0 < a["decode_seconds"] <= a["seconds"] and 0 < a["fraction_of_limit"]
    assert a["device"].startswith("CPU") and a["peak_memory_gb"] > 0
    saved = runs.load_csv(out)
    assert list(saved.columns) == bench.COLUMNS and list(saved.part) == ["a", "step"]


def test_step_and_single_parts_report_their_ratios(tmp_path):
    rows = bench.main(_args(tmp_path, "--parts", "single", "step", "--limit", "2"))
    single, step = rows
    assert single["status"] == step["status"] == "ok"
    assert single["decodes"] > 0 and single["batched_speedup"] > 0 and single["batch_size"] == 1
    # timings, not behaviour: present and finite (a loaded machine can make a difference of two
    # wall-clock times negative, which the row's note then says)
    for key in ("step_ms", "eager_step_ms", "generate_step_ms", "speedup_vs_generate",
                "fraction_of_limit"):
        assert math.isfinite(step[key]), key


def test_a_failing_part_is_a_row_and_the_next_part_runs(tmp_path, monkeypatch):
    def broken(ctx, workdir):
        raise RuntimeError("boom")
    monkeypatch.setattr(bench, "part_b", broken)
    rows = bench.main(_args(tmp_path, "--parts", "b", "e", "--limit", "3"))
    assert rows[0]["status"] == "error" and "boom" in rows[0]["note"]
    assert rows[1]["part"] == "e" and rows[1]["status"] in ("ok", "skipped")
    assert len(runs.load_csv(tmp_path / "bench.csv")) == 2


def test_a_csv_of_another_schema_is_refused(tmp_path):
    (tmp_path / "bench.csv").write_text('"shape","device"\n"tiny","CPU"\n')
    with pytest.raises(runs.UsageError, match="another schema"):
        bench.main(_args(tmp_path, "--parts", "e"))
    with pytest.raises(runs.UsageError, match="--limit 1"):
        bench.main(bench.parse_args(["--shape", "tiny", "--limit", "1", "--out",
                                     str(tmp_path / "new.csv")]))
    assert not (tmp_path / "new.csv").exists()


def test_the_cost_model_scales_a_row_of_the_same_kind_of_device_and_size():
    import pandas as pd
    size = cost.parameter_count(cost.shape_config("qwen2.5-3b"))
    row = {c: None for c in cost.COLUMNS}
    rows = pd.DataFrame([dict(row, run="2", part="b", status="ok", shape="qwen2.5-3b",
                              device="CPU (another)", seconds=10.0, pairs=40,
                              matmul_tflops=1.0),
                         dict(row, run="3", part="b", status="ok", shape="qwen2.5-3b",
                              device="NVIDIA H200", seconds=1.0, pairs=40, matmul_tflops=700.0)])
    # a row of an older bench (no work): twice the pairs, twice the parameters, a device twice
    # as fast: 10 s x 2 x 2 / 2
    seconds, basis = cost.estimate("b", rows, None, 80, 2 * size, 2.0, "cpu")
    assert seconds == pytest.approx(20.0) and "on CPU" in basis and "by pairs" in basis
    # no row of a model within 10x of the size on this kind of device: no number, and how to get one
    seconds, basis = cost.estimate("b", rows, None, 80, size / 10**5, 2.0, "cpu")
    assert seconds is None and "python bench.py --parts b --shape tiny --device cpu" in basis
    assert cost.estimate("e", rows, None, 80, size, 2.0, "cpu")[0] is None


def test_the_cost_model_is_the_line_through_a_rows_smoke_and_full_runs():
    """fixed + rate x work: the rate from the two runs of the row (and only the rate scales with
    the model), the fixed time where the line meets no work."""
    import pandas as pd
    size = cost.shape_parameters("tiny")
    row = dict({c: None for c in cost.COLUMNS}, run="1", part="d", status="ok", shape="tiny",
               device=cost.device_name("cpu"), seconds=5.0, pairs=6, work=1000.0,
               smoke_seconds=1.4, smoke_work=100.0, matmul_tflops=0.05)
    rows = pd.DataFrame([row])
    fixed, rate, _ = cost.fixed_and_rate(rows.iloc[0])
    assert rate == pytest.approx(3.6 / 900) and fixed == pytest.approx(1.0)
    seconds, basis = cost.estimate("d", rows, 500.0, 12, size, 9.9, "cpu")  # same device: no rate
    assert seconds == pytest.approx(1.0 + 2.0) and "units of work" in basis
    seconds, _ = cost.estimate("d", rows, 500.0, 12, 2 * size, 9.9, "cpu")
    assert seconds == pytest.approx(1.0 + 4.0)  # twice the parameters: the rate doubles
    # a time that did not rise with the work: the fixed costs decided it, their mean for any work
    flat = pd.DataFrame([dict(row, seconds=1.2, smoke_seconds=1.6)])
    assert cost.estimate("d", flat, 5000.0, 12, size, 9.9, "cpu")[0] == pytest.approx(1.4)
    # a time that grew faster than the work (the line meets no work below 0): never below the
    # time proportional to the work through the lower point
    steep = pd.DataFrame([dict(row, seconds=20.0, smoke_seconds=1.0)])
    assert cost.estimate("d", steep, 50.0, 12, size, 9.9, "cpu")[0] == pytest.approx(0.5)
    assert cost.estimate("d", steep, 100.0, 12, size, 9.9, "cpu")[0] == pytest.approx(1.0)


def test_an_experiment_row_holds_its_work_its_smoke_run_and_the_estimate_made_before_it(
        tmp_path):
    """What the cost model is checked with: a second bench run's rows hold the estimate made from
    the first run's rows beside the time measured (their ratio is bench's output, not a test)."""
    for _ in range(2):
        rows = bench.main(_args(tmp_path, "--parts", "b", "d", "--pairs", "6"))
    saved = runs.load_csv(tmp_path / "bench.csv")
    assert list(saved.columns) == bench.COLUMNS and len(saved) == 4
    for column in ("seconds", "work", "smoke_seconds", "smoke_work", "estimate_s"):
        assert saved[column].iloc[2:].notna().all() and (saved[column].iloc[2:] > 0).all(), column
    for row in rows:
        assert row["estimate_s"] > 0 and row["status"] == "ok"


def test_a_table_of_an_earlier_bench_gets_the_new_columns_and_keeps_its_rows(tmp_path):
    old = cost.COLUMNS[:cost.COLUMNS.index("note") + 1]
    cells = {"run": '"x"', "part": '"x"', "status": '"ok"', "seconds": "1.5", "pairs": "6"}
    row = ",".join(cells.get(c, '""') for c in old)
    (tmp_path / "bench.csv").write_text(",".join(f'"{c}"' for c in old) + "\n" + row + "\n")
    bench.main(_args(tmp_path, "--parts", "b", "--pairs", "3"))
    saved = runs.load_csv(tmp_path / "bench.csv")
    assert list(saved.columns) == bench.COLUMNS and list(saved.part) == ["x", "b"]
    lines = (tmp_path / "bench.csv").read_text().splitlines()
    assert lines[1] == row + ',"","","",""'  # the earlier row as it was written, 4 cells added
