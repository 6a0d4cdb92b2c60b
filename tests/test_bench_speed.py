"""`python -m leantune.bench.speed` on the tiny size: every mode named runs and reports."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from leantune.bench import speed, speed_table


def test_speed_bench_runs_forward_loss_mezo_lora_and_lst_modes(tmp_path, capsys):
    modes = ["fwd_loss", "lt_mezo", "lt", "lt_lst", "lt_lean", "lt_lean_keep", "lt_lean1", "boom"]
    assert speed.main(["--size", "tiny", "--modes", ",".join(modes), "--steps", "2", "--warmup", "1",
                       "--batch", "2", "--seq", "32", "--out", str(tmp_path)]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    rows = {r["mode"]: r for r in printed if "mode" in r and "step_s" in r}
    assert list(rows) == modes[:-1]
    report = json.loads((tmp_path / "speed_tiny.json").read_text())
    assert report["host_cpu"].endswith(f"{os.cpu_count()} cores") and len(report["host_cpu"]) > 10
    by = {r["mode"]: r for r in report["results"]}
    assert by["boom"]["error"].startswith("ValueError: unknown mode 'boom'"), "one bad mode costs only its own row"
    for mode in modes[:-1]:
        r = by[mode]
        assert r["name"] == speed.mode_name(mode) and r["step_s"] > 0 and r["tok_s"] > 0
        assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"])
    assert by["fwd_loss"]["n_train"] == 0
    assert by["lt_mezo"]["n_train"] == by["lt"]["n_train"] > 0
    # the same batches, model and initial adapter (B = 0): every mode's first loss is the base
    # model's; MeZO reports the mean of L(θ ± εz), which is O(ε²) away
    assert abs(by["lt"]["losses"][0] - by["fwd_loss"]["losses"][0]) < 1e-4
    assert by["lt_lean1"]["name"] == "leantune LoRA, lean on the first layer only"
    for lean in ("lt_lean", "lt_lean_keep", "lt_lean1"):
        assert by[lean]["losses"] == pytest.approx(by["lt"]["losses"], rel=1e-4), f"{lean}: the same function"
    assert abs(by["lt_mezo"]["losses"][0] - by["fwd_loss"]["losses"][0]) < 1e-2
    assert abs(by["lt_lst"]["losses"][0] - by["fwd_loss"]["losses"][0]) < 1e-4  # LST starts as the base
    assert (tmp_path / "speed_tiny.png").is_file()
    table = (tmp_path / "speed_tiny.md").read_text()
    assert all(f"| {speed.mode_name(m)} | {by[m]['tok_s']:,} |" in table for m in modes[:-1])
    # how long the host took to issue each step: never more than the step (on a CPU, about the step)
    for mode in modes[:-1]:
        r = by[mode]
        assert 0 < r["host_issue_ms"] <= r["step_s"] * 1e3 + 0.06, "issued before it ends (step_s is rounded to 0.1 ms)"
        assert f"| {r['step_s'] * 1e3:.1f} | {r['host_issue_ms']:.1f} |" in table
    phases = by["lt"]["host_phases_ms"]
    assert sorted(phases) == ["backward", "forward", "optimizer"] and all(v > 0 for v in phases.values())
    assert sum(phases.values()) <= by["lt"]["host_issue_ms"] + 0.05
    assert "host_phases_ms" not in by["lt_mezo"] and "host_phases_ms" not in by["fwd_loss"], "no backward to split"


def test_a_mode_whose_loss_turns_nan_is_flagged_and_left_out_of_ratios_and_chart(tmp_path, capsys, monkeypatch):
    real_setup = speed.setup

    def poisoned(mode, model):
        s = real_setup(mode, model)
        if mode == "lt":  # the second step's loss (and all after it) is NaN
            calls, loss = [], s.loss
            s.loss = lambda *a: loss(*a) * (float("nan") if calls.append(1) or len(calls) > 1 else 1.0)
        return s

    monkeypatch.setattr(speed, "setup", poisoned)
    assert speed.main(["--size", "tiny", "--modes", "peft,lt", "--steps", "2", "--warmup", "1",
                       "--batch", "2", "--seq", "32", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "speed_tiny.json").read_text())
    by = {r["mode"]: r for r in report["results"]}
    assert "error" not in by["peft"]
    assert by["lt"]["error"] == "loss not finite from step 1 on: not a result"
    assert by["lt"]["tok_s"] > 0, "the numbers stay for diagnosis"
    assert not report["loss_match"], "no loss comparison with a diverged run"
    peft = dict(mode="peft_compile", tok_s=1.0, peak_gib=1.0)
    assert speed.ratios([peft, dict(by["lt"], mode="lt_compile")]) == []
    assert speed.ratios([peft, dict(by["peft"], mode="lt_compile")]), "the same row without the flag counts"
    assert '"error": "loss not finite' in capsys.readouterr().out


def test_mezo_mode_trains_with_forward_passes_only():
    s = speed.setup("lt_mezo", speed.build("tiny", "cpu"))
    assert s.optimizer == "mezo" and s.flops_factor == 4 and s.params
    f = speed.setup("fwd_loss", speed.build("tiny", "cpu"))
    assert f.optimizer == "none" and f.flops_factor == 2 and not f.params


def test_cuda_graph_ratios_compare_against_the_faster_compiled_peft():
    results = [dict(mode="peft_compile", tok_s=50.0, peak_gib=10.0), dict(mode="peft_compile_cg", tok_s=52.0, peak_gib=9.0),
               dict(mode="lt_compile_cg", tok_s=65.0, peak_gib=6.0), dict(mode="lt_compile", tok_s=60.0, peak_gib=6.0)]
    got = {(r["name"], r["metric"]): r for r in speed.ratios(results)}
    best = got[("lt_cg_vs_peft_best", "tok_s")]
    assert best["theirs"] == "peft_compile_cg" and best["ratio"] == 1.25
    assert got[("lt_cg_vs_peft_best", "peak_gib")]["ratio"] == round(6.0 / 9.0, 3)
    assert got[("lt_vs_peft", "tok_s")]["theirs"] == "peft_compile" and got[("lt_vs_peft", "tok_s")]["ratio"] == 1.2


def test_lean_with_cuda_graphs_is_compared_with_the_faster_peft_checkpointing_and_held_to_lean_targets():
    results = [dict(mode="peft_gc_compile", tok_s=40.0, peak_gib=6.0), dict(mode="peft_gc_compile_cg", tok_s=38.0, peak_gib=5.0),
               dict(mode="lt_lean_compile_cg", tok_s=58.0, peak_gib=4.5), dict(mode="peft_compile", tok_s=99.0, peak_gib=1.0)]
    got = {(r["name"], r["metric"]): r for r in speed.ratios(results)}
    assert got[("lean_cg_vs_peft_gc_best", "tok_s")] == dict(name="lean_cg_vs_peft_gc_best", ours="lt_lean_compile_cg",
                                                             theirs="peft_gc_compile", metric="tok_s", ratio=1.45)
    assert got[("lean_cg_vs_peft_gc_best", "peak_gib")]["ratio"] == round(4.5 / 6.0, 3)
    assert speed_table.target("lean_cg_vs_peft_gc_best", "tok_s") == (">=", 1.5)
    assert speed_table.verdict(1.45, speed_table.target("lean_cg_vs_peft_gc_best", "tok_s")) == "**missed**"
    assert speed_table.target("lt_cg_vs_peft_best", "peak_gib") == ("<=", 0.75)


def test_lean_on_the_first_layers_is_compared_with_peft_checkpointing_compiled_alike():
    results = [dict(mode="peft_gc_compile", tok_s=40.0, peak_gib=6.0), dict(mode="peft_gc", tok_s=30.0, peak_gib=7.0),
               dict(mode="lt_lean10_compile", tok_s=60.0, peak_gib=4.5), dict(mode="lt_lean3", tok_s=33.0, peak_gib=3.5)]
    got = {(r["name"], r["metric"]): r for r in speed.ratios(results)}
    assert got[("lean10_vs_peft_gc", "tok_s")] == dict(name="lean10_vs_peft_gc", ours="lt_lean10_compile",
                                                       theirs="peft_gc_compile", metric="tok_s", ratio=1.5)
    assert got[("lean10_vs_peft_gc", "peak_gib")]["ratio"] == 0.75
    assert got[("lean3_vs_peft_gc", "tok_s")]["theirs"] == "peft_gc" and got[("lean3_vs_peft_gc", "tok_s")]["ratio"] == 1.1


def test_timeline_splits_idle_time_into_host_launch_waits_and_other_gaps():
    from leantune.bench.timeline import gap_summary

    def kernel(name, ts, dur, corr):
        return dict(ph="X", cat="kernel", name=name, ts=ts, dur=dur, args=dict(correlation=corr))

    def launch(ts, corr):
        return dict(ph="X", cat="cuda_runtime", name="cudaLaunchKernel", ts=ts, dur=3, args=dict(correlation=corr))

    trace = {"traceEvents": [
        dict(ph="X", cat="cpu_op", name="step", ts=0, dur=5),
        launch(1, 1), kernel("gemm", 10, 50, 1),       # 10 µs before the first kernel
        launch(20, 2), kernel("merge", 61, 10, 2),     # 1 µs: dispatch latency
        launch(80, 3), kernel("thin", 85, 5, 3),       # 14 µs: launched after "merge" ended
        launch(30, 4), kernel("gemm", 100, 20, 4),     # 10 µs, launched long before: not the host
    ]}
    got = gap_summary(trace, top=2)
    assert got["lead_us"] == 10 and got["span_us"] == 120 and got["busy_us"] == 85 and got["kernels"] == 4
    assert got["idle_host_launch_us"] == 14 and got["idle_other_us"] == 10 and got["idle_small_us"] == 1
    assert [g["before"] for g in got["longest_gaps"]] == ["thin", "gemm"]
    assert got["top_kernels"][0] == dict(name="gemm", us=70)
    assert got["lead_host_spans"][0] == dict(name="step", us=5)
    with pytest.raises(ValueError, match="no device events"):
        gap_summary({"traceEvents": [dict(ph="X", cat="cpu_op", name="x", ts=0, dur=1)]})


def test_markdown_table_lists_every_mode_and_judges_each_ratio_against_the_issue_targets(tmp_path):
    rows = [dict(mode="peft_compile", tok_s=50_000, peak_gib=10.0), dict(mode="lt_compile", tok_s=80_000, peak_gib=8.0),
            dict(mode="peft_gc_compile", tok_s=40_000, peak_gib=6.0), dict(mode="lt_lean3_compile", tok_s=61_000, peak_gib=4.7)]
    results = [dict(r, name=speed.mode_name(speed.split_label(r["mode"])[0]), tflops=1.0, first_step_s=9.0,
                    losses=[2.0, 1.5]) for r in rows]
    results.append(dict(mode="lt_lst_compile", size="1b", error="OOM"))
    results.append(dict(results[1], mode="lt_compile_cg", error="loss not finite from step 1 on: not a result"))
    report = dict(size="1b", device="GPU X", host_cpu="CPU Y, 16 cores", torch="2.x", steps=2, warmup=1,
                  argv=["--size", "1b"], results=results, ratios=speed.ratios(results),
                  loss_match=[speed.loss_match(results, "lt_compile", "peft_compile")])
    table = speed_table.markdown(report)
    assert "`python -m leantune.bench.speed --size 1b`" in table and "GPU X" in table
    for r in rows:
        assert f"{r['tok_s']:,}" in table
    assert "| lt_lst_compile | failed: OOM |" in table
    assert "(not a result: loss not finite" in table
    lines = {tuple(c.strip() for c in line.split("|")[1:5]): line for line in table.splitlines() if "_vs_" in line}
    assert lines[("lt_vs_peft", "lt_compile", "peft_compile", "tokens/s")].endswith("| 1.600 | >= 1.5 | met |")
    assert lines[("lt_vs_peft", "lt_compile", "peft_compile", "peak memory")].endswith("| 0.800 | <= 0.75 | **missed** |")
    # lean on the first n layers answers to lean mode's targets
    assert lines[("lean3_vs_peft_gc", "lt_lean3_compile", "peft_gc_compile", "tokens/s")].endswith("| 1.525 | >= 1.5 | met |")
    assert lines[("lean3_vs_peft_gc", "lt_lean3_compile", "peft_gc_compile", "peak memory")].endswith(
        "| 0.783 | <= 0.8 | met |")
    assert "| lt_compile | peft_compile | 2 | 0.00% | 0.00% |" in table
    assert speed_table.verdict(1.0, None) == ""

    path = tmp_path / "speed_1b.json"
    path.write_text(json.dumps(report))
    assert speed.main(["--plot", str(path)]) == 0
    assert (tmp_path / "speed_1b.md").read_text() == table, "--plot rewrites the tables from the JSON alone"


def test_an_empty_mode_list_stops_before_any_work_with_a_message(tmp_path):
    with pytest.raises(SystemExit, match="--modes names no mode"):
        speed.main(["--size", "tiny", "--modes", " , ", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists(), "nothing was created for a run that cannot start"


def test_a_mode_run_twice_keeps_a_labelled_bar_per_run_in_the_chart(tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leantune.bench import plot

    rows = [dict(mode=m, name=speed.mode_name(speed.split_label(m)[0]), tok_s=t, peak_gib=g, losses=[2.0, 1.0])
            for m, t, g in (("peft_compile", 50_000, 10.5), ("lt_compile", 69_028, 5.93), ("lt_compile", 68_777, 5.94))]
    labels = speed_table.row_labels(rows)
    assert labels == [rows[0]["name"], rows[1]["name"], f"{rows[1]['name']} (run 2)"]
    figures = []
    monkeypatch.setattr(plt.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    monkeypatch.setattr(plt, "close", lambda fig: None)
    plot.draw(dict(results=rows, size="1b", device="GPU X", torch="2.x"), tmp_path / "chart.png")
    speed_axis, memory_axis, loss_axis = figures[0].axes
    assert [t.get_text() for t in speed_axis.get_yticklabels()] == labels
    assert [round(b.get_width()) for b in speed_axis.patches] == [50_000, 69_028, 68_777], "one bar per run"
    assert [b.get_width() for b in memory_axis.patches] == [10.5, 5.93, 5.94]
    assert [line.get_label() for line in loss_axis.get_lines()] == labels
    table = speed_table.markdown(dict(results=[dict(r, tflops=1.0, first_step_s=1.0) for r in rows], size="1b",
                                      device="GPU X", torch="2.x", steps=2, warmup=1))
    assert f"| {labels[2]} | 68,777 |" in table, "the table names the second run as the chart does"


def test_at_lt_compiles_the_bound_or_peft_through_lt_compile(monkeypatch):
    used = []
    monkeypatch.setattr(speed.lt, "compile", lambda fn, **kw: used.append("lt.compile") or fn)
    monkeypatch.setattr(speed.torch, "compile", lambda fn, **kw: used.append("torch.compile") or fn)
    data = speed.batches("tiny", 1, 2, 16, "cpu")
    results = [speed.run_mode(label, "tiny", data, 1, 0, 1e-3, "cpu")
               for label in ("frozen_compile", "frozen_compile@lt", "lt_compile")]
    assert used == ["torch.compile", "lt.compile", "lt.compile"]
    assert [r["name"] for r in results] == ["frozen backbone (bound), compiled",
                                            "frozen backbone (bound), compiled through lt.compile",
                                            "leantune LoRA, compiled"]
    assert results[1]["losses"] == results[0]["losses"], "the same model and batches"
    assert [r["name"] for r in speed.ratios(results)] == ["lt_vs_bound", "lt_vs_bound_lt"]
    with pytest.raises(ValueError, match="must be compiled"):
        speed.run_mode("frozen@lt", "tiny", data, 1, 0, 1e-3, "cpu")


def test_guard_bench_times_both_libraries_and_names_a_bad_one(capsys):
    from leantune.bench import guards

    assert guards.main(["--layers", "2", "--repeats", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["library"], r["layers"]) for r in rows] == [("leantune", 2), ("peft", 2)]
    assert all(len(r["lookup_ms"]) == 1 and r["lookup_ms"][0] > 0 for r in rows)
    with pytest.raises(SystemExit, match="'hf' is neither leantune nor peft"):
        guards.main(["--layers", "2", "--libraries", "hf"])


def test_compile_cache_lets_a_fresh_process_find_the_graphs_another_one_compiled(tmp_path):
    from .train_helpers import subprocess_env

    cache = tmp_path / "compile-cache.bin"
    graphs = []
    for run in ("first", "second"):  # each with an empty inductor cache of its own: only the file links them
        env = {**subprocess_env(), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{run}")}
        subprocess.run([sys.executable, "-m", "leantune.bench.speed", "--size", "tiny", "--modes", "fwd_compile",
                        "--steps", "1", "--warmup", "0", "--batch", "2", "--seq", "32", "--out", str(tmp_path / run),
                        "--compile-cache", str(cache)], env=env, check=True, capture_output=True, text=True)
        report = json.loads((tmp_path / run / "speed_tiny.json").read_text())
        graphs.append(report["results"][0]["compiled_graphs"])
    assert cache.stat().st_size > 0
    assert graphs[0]["miss"] >= 1 and graphs[0]["hit"] == 0, "the first process compiles the forward"
    assert graphs[1] == {"hit": graphs[0]["miss"], "miss": 0}, "the second finds every graph in the file"


def test_a_compile_cache_that_cannot_be_read_is_skipped_with_a_message(tmp_path, capsys):
    from leantune.bench import compile_cache

    assert compile_cache.load(tmp_path / "absent.bin") == 0 and capsys.readouterr().out == ""
    (tmp_path / "torn.bin").write_bytes(b"half a cache")
    assert compile_cache.load(tmp_path / "torn.bin") == 0
    assert "could not load" in capsys.readouterr().out
