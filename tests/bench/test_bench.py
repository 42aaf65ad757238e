"""The benchmark runs end to end and reports consistent numbers (no timing thresholds)."""

import json
import math
import os
import subprocess
import sys

import pytest

from noisy_keras import bench
from noisy_keras.bench import cli
from noisy_keras.bench.engine import ENGINE_DEVICES

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    """Runs `python -m noisy_keras.bench --quick` once, in a fresh process and a fresh cwd."""
    cwd = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    completed = subprocess.run(
        [sys.executable, "-m", "noisy_keras.bench", "--quick"],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert os.listdir(cwd) == ["bench-quick.json"]  # never the full run's bench.json
    return json.loads((cwd / "bench-quick.json").read_text()), completed.stdout


def _positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_run_has_every_part_and_prints_tables(quick_results):
    results, stdout = quick_results
    assert set(bench.PART_NAMES) <= set(results)
    assert results["meta"]["quick"] is True
    assert set(results["meta"]["part_seconds"]) == set(bench.PART_NAMES)
    for heading in (
        "Noise overhead",
        "Engine throughput",
        "validation accuracy",
        "memory",
        "Streamed folder input",
        "GPU check",
    ):
        assert heading in stdout
    # Labelled as a smoke test before and after the tables, and in the JSON.
    lines = stdout.strip().splitlines()
    assert lines[0] == lines[-2] == cli.SMOKE_TEST_NOTE and "measure nothing" in lines[0]
    assert lines[-1].startswith("noisy_keras.bench: wrote the smoke test to bench-quick.json")
    assert results["meta"]["note"] == cli.SMOKE_TEST_NOTE


def test_noise_ratios_are_ratios_of_the_reported_medians(quick_results):
    noise = quick_results[0]["noise"]
    assert {(c["xla"], c["optimizer"]) for c in noise["cases"]} == {
        (False, "momentum"),
        (True, "momentum"),
    }
    for case in noise["cases"]:
        assert _positive(case["bare_ms"]) and _positive(case["noisy_ms"])
        assert case["ratio"] == pytest.approx(case["noisy_ms"] / case["bare_ms"], rel=1e-12)
        assert case["overhead_pct"] == pytest.approx(100 * (case["ratio"] - 1), rel=1e-9, abs=1e-9)
        expected_ns = (case["noisy_ms"] - case["bare_ms"]) * 1e6 / case["params"]
        assert case["overhead_ns_per_param"] == pytest.approx(expected_ns, rel=1e-9, abs=1e-9)
        assert case["overhead_vs_floor"] == pytest.approx(
            case["overhead_ns_per_param"] / case["floor_philox_ns_per_param"], rel=1e-12
        )
    assert {f["xla"] for f in noise["floors"]} == {False, True}
    for floor in noise["floors"]:
        for name in ("unit_noise", "philox", "auto_select", "elementwise"):
            assert _positive(floor[f"{name}_ns_per_param"])
        assert floor["unit_noise_vs_philox"] == pytest.approx(
            floor["unit_noise_ns_per_param"] / floor["philox_ns_per_param"], rel=1e-12
        )


def test_noise_kinds_report_every_kind_against_none(quick_results):
    (case,) = quick_results[0]["noise_kinds"]["cases"]
    rows = {row["kind"]: row for row in case["kinds"]}
    assert list(rows) == ["none", "white", "matched", "multiplicative"]
    assert "Noise kinds through the engine" in quick_results[1]
    for row in rows.values():
        assert _positive(row["update_ms"]) and row["updates_timed"] >= 1
        assert row["ratio"] == pytest.approx(row["update_ms"] / rows["none"]["update_ms"], 1e-12)
        assert row["overhead_pct"] == pytest.approx(100 * (row["ratio"] - 1), abs=1e-9)
    assert rows["none"]["ratio"] == 1.0


def test_methods_report_every_method_against_plain_sgd(quick_results):
    from noisy_keras.bench.methods import METHODS

    (case,) = quick_results[0]["methods"]["cases"]
    rows = {row["kind"]: row for row in case["methods"]}
    assert tuple(rows) == METHODS and METHODS[0] == "sgd"
    assert "Compared methods through the engine" in quick_results[1]
    for row in rows.values():
        assert _positive(row["update_ms"]) and row["updates_timed"] == 4  # 2 rounds x 2 steps
        assert row["ratio"] == pytest.approx(row["update_ms"] / rows["sgd"]["update_ms"], 1e-12)
    assert rows["sgd"]["ratio"] == 1.0


def test_each_benchmarked_method_model_trains_with_its_method():
    from noisy_keras.bench import methods, workloads
    from noisy_keras.engine.cores import gradient_method
    from noisy_keras.optim.sharpness import SAM, GradientNormPenalty

    workload = workloads.Workload(workloads.DIGITS_MLP, 64)
    expected = {
        "sgd": (None, False),
        "sam": (SAM(0.05), False),
        "adaptive_sam": (SAM(0.5, adaptive=True), False),
        "penalty_finite_difference": (GradientNormPenalty(0.01), False),
        "penalty_double_backprop": (GradientNormPenalty(0.01, gradient="double_backprop"), False),
        "ema": (None, True),
    }
    assert tuple(expected) == methods.METHODS
    for name, (method, ema) in expected.items():
        model = methods._method_model(name, workload, jit_compile=True)
        assert gradient_method(model) == method and model.optimizer.use_ema == ema, name


def test_engine_reports_three_paths_with_consistent_throughput(quick_results):
    (case,) = quick_results[0]["engine"]["cases"]
    rows = {row["config"]: row for row in case["configs"]}
    assert {"engine_mirrored_xla", "keras_mirrored", "keras_single_xla"} <= set(rows)
    assert rows["engine_mirrored_xla"]["replicas"] == ENGINE_DEVICES
    assert rows["keras_mirrored"]["replicas"] == ENGINE_DEVICES
    assert rows["keras_single_xla"]["replicas"] == 1
    for row in rows.values():
        assert _positive(row["step_ms"]) and row["steps_timed"] >= 1
        assert row["examples_per_s"] == pytest.approx(
            case["global_batch_size"] / (row["step_ms"] / 1e3), rel=1e-9
        )
    for other in ("keras_mirrored", "keras_single_xla"):
        assert case[f"engine_vs_{other}"] == pytest.approx(
            rows["engine_mirrored_xla"]["examples_per_s"] / rows[other]["examples_per_s"],
            rel=1e-12,
        )


def test_gpu_check_smoke_run_checks_xla_replicas_and_loss_and_measures(quick_results):
    """On CPU: mlp in mixed_float16 on 2 logical devices; the GPU run adds the other models."""
    gpu_check = quick_results[0]["gpu_check"]
    assert gpu_check["precision"] == "mixed_float16" and gpu_check["failed"] == []
    (case,) = gpu_check["cases"]
    assert case["model"] == "mlp" and case["replicas"] == ENGINE_DEVICES
    assert case["precision"] == "mixed_float16"
    for check in ("xla_compiled", "replicas_identical", "loss_finite", "loss_scaled", "ok"):
        assert case[check] is True, check
    assert case["train_traces"] >= 1 and len(case["losses"]) == 2
    throughput = case["throughput"]
    assert throughput["precision"] == "mixed_float16"
    assert throughput["global_batch_size"] == case["global_batch_size"]
    rows = {row["config"]: row for row in throughput["configs"]}
    for other in ("keras_mirrored", "keras_single_xla"):
        assert throughput[f"engine_vs_{other}"] == pytest.approx(
            rows["engine_mirrored_xla"]["examples_per_s"] / rows[other]["examples_per_s"],
            rel=1e-12,
        )


def test_gpu_check_sees_replicas_that_differ():
    import keras
    import numpy as np

    from noisy_keras.bench import gpu_check
    from noisy_keras.engine.distribute import make_strategy

    with make_strategy("mirrored", 2).scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(optimizer="sgd", loss="mse")
    model.optimizer.build(model.trainable_variables)
    assert gpu_check.replicas_identical(model)
    copy = model.layers[0].kernel.value.values[1]
    copy.assign(np.asarray(copy) + 1.0)
    assert not gpu_check.replicas_identical(model)


def test_time_to_accuracy_reports_each_configuration(quick_results):
    (task,) = quick_results[0]["time_to_accuracy"]["tasks"]
    large = task["task"]["large_batch_size"]
    assert [s["config"] for s in task["summary"]] == ["B=32", f"B={large}", f"B={large}+noise"]
    assert len(task["runs"]) == 3
    for run in task["runs"]:
        assert run["status"] == "done"
        if run["reached"]:
            assert _positive(run["time_to_target_s"]) and run["steps_to_target"] >= 1
            assert run["time_to_target_s"] <= run["run_time_s"]
        else:
            assert run["time_to_target_s"] is None and run["steps_to_target"] is None
    # The smoke target (15%) is one a single epoch of B=32 reaches.
    assert task["runs"][0]["config"] == "B=32" and task["runs"][0]["reached"]


def test_memory_ratio_is_noisy_over_bare(quick_results):
    (case,) = quick_results[0]["memory"]["cases"]
    assert _positive(case["bare_mb"]) and _positive(case["noisy_mb"])
    assert case["ratio"] == pytest.approx(case["noisy_mb"] / case["bare_mb"], rel=1e-12)
    assert case["delta_mb"] == pytest.approx(case["noisy_mb"] - case["bare_mb"], abs=1e-9)


def test_input_part_reports_throughput_model_rate_and_memory_growth(quick_results):
    inputs = quick_results[0]["input"]
    model = inputs["model"]
    assert model["images_per_s"] == pytest.approx(
        model["batch_size"] / (model["step_ms"] / 1e3), rel=1e-9
    )
    assert {row["preprocess"] for row in inputs["throughput"]} == {"resize", "resnet"}
    for row in inputs["throughput"]:
        assert row["images_per_s"] == pytest.approx(
            row["batch_size"] * row["batches"] / row["seconds"], rel=1e-9
        )
        assert row["images_per_s_per_thread"] == pytest.approx(
            row["images_per_s"] / row["threads"], rel=1e-12
        )
        assert row["cores_to_feed_model"] == pytest.approx(
            model["images_per_s"] / row["images_per_s_per_thread"], rel=1e-12
        )
    peaks = {(m["images"], m["streaming"]): m["peak_mb"] for m in inputs["memory"]}
    sizes = sorted({images for images, _ in peaks})
    assert len(sizes) == 2 and all(_positive(mb) for mb in peaks.values())
    for mode, growth in inputs["memory_growth_mb"].items():
        assert growth == pytest.approx(peaks[(sizes[1], mode)] - peaks[(sizes[0], mode)])


def test_interleaved_step_times_alternates_order_and_counts_calls():
    calls = []
    times = bench.interleaved_step_times(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        rounds=3,
        steps_per_round=2,
        warmup=1,
    )
    assert calls == ["a", "b"] + ["a", "a", "b", "b", "b", "b", "a", "a", "a", "a", "b", "b"]
    assert {name: len(t) for name, t in times.items()} == {"a": 6, "b": 6}
    assert all(t >= 0 for t in times["a"] + times["b"])


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"rounds": 0, "steps_per_round": 1}, "rounds"),
        ({"rounds": 1, "steps_per_round": 0}, "steps_per_round"),
        ({"rounds": 1, "steps_per_round": 1, "warmup": -1}, "warmup"),
    ],
)
def test_interleaved_step_times_rejects_bad_counts(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        bench.interleaved_step_times({"a": lambda: None}, **kwargs)


def test_unknown_parts_are_named():
    with pytest.raises(ValueError, match="parts must be .*noise.*received \\['gpu'\\]"):
        bench.run_benchmarks(parts=["gpu"])


def test_bad_flag_value_is_rejected_by_the_command_line(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "noisy_keras.bench", "--parts=noise,gpu"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert completed.returncode != 0
    assert "--parts must be a comma-separated list" in completed.stderr


@pytest.mark.parametrize(
    "config, expected",
    [
        ("engine_mirrored_xla", dict(replicas=2, keras_xla=False, engine=True, engine_xla=True)),
        ("keras_mirrored", dict(replicas=2, keras_xla=False, engine=False, engine_xla=False)),
        ("keras_single_xla", dict(replicas=1, keras_xla=True, engine=False, engine_xla=False)),
        (
            "engine_mirrored_no_xla",
            dict(replicas=2, keras_xla=False, engine=True, engine_xla=False),
        ),
        ("keras_single", dict(replicas=1, keras_xla=False, engine=False, engine_xla=False)),
    ],
)
def test_each_engine_configuration_compiles_as_its_label_says(config, expected):
    """`engine_mirrored_no_xla` once ran with XLA: its name ends in "_xla" too."""
    from noisy_keras.bench import engine, workloads

    assert set(engine.ENGINE_CONFIGS) == set(engine.CONFIG_SETTINGS)
    label = engine.ENGINE_CONFIGS[config]
    assert ("jit_compile=True" in label) == (expected["keras_xla"] or expected["engine_xla"])
    assert ("MirroredStrategy" in label) == (expected["replicas"] == 2)
    model, strategy = engine._engine_model(config, workloads.Workload(workloads.DIGITS_MLP, 64))
    assert engine.compiled_as(model, strategy) == expected


def engine_table(paths) -> str:
    """The benchmarks page's engine table, from the committed runs of `--parts=engine`."""
    from noisy_keras.bench.engine import ENGINE_CONFIGS

    runs = [json.load(open(p)) for p in paths]
    cells = {}
    for run in runs:
        assert run["meta"]["tensorflow"] == "2.21.0" and run["meta"]["keras"] == "3.15.1"
        for case in run["engine"]["cases"]:
            for row in case["configs"]:
                cells.setdefault(row["config"], {}).setdefault(case["model"], []).append(
                    f"{row['examples_per_s']:.0f}"
                )
            for key, ratio in case.items():
                if key.startswith("engine_"):
                    cells.setdefault(key, {}).setdefault(case["model"], []).append(f"{ratio:.2f}x")
    lines = [
        "| configuration | cnn, B=512 | resnet20, B=128 |",
        "|---|---|---|",
    ]
    for key, by_model in cells.items():
        label = ENGINE_CONFIGS.get(key, key)
        lines.append(
            f"| {label} | "
            + " | ".join(", ".join(by_model.get(m, ["-"])) for m in ("cnn", "resnet20"))
            + " |"
        )
    return "\n".join(lines)


def test_the_benchmarks_page_shows_the_committed_engine_runs():
    paths = sorted(
        os.path.join(REPO, "results", "bench", name)
        for name in os.listdir(os.path.join(REPO, "results", "bench"))
        if name.startswith("engine_run")
    )
    page = open(os.path.join(REPO, "docs", "how-to", "benchmarks.md")).read()
    assert engine_table(paths) in page


def methods_table(paths) -> str:
    """The benchmarks page's methods table, from the committed runs of `--parts=methods`."""
    runs = [json.load(open(p)) for p in paths]
    rows = {}
    for run in runs:
        assert run["meta"]["tensorflow"] == "2.21.0" and run["meta"]["keras"] == "3.15.1"
        (case,) = run["methods"]["cases"]
        assert (case["model"], case["batch_size"], case["xla"]) == ("cnn", 512, True)
        for row in case["methods"]:
            rows.setdefault(row["kind"], []).append(
                (f"{row['update_ms']:.1f}", f"{row['ratio']:.2f}x")
            )
    lines = ["| method | update ms | ratio to sgd |", "|---|---|---|"]
    for kind, cells in rows.items():
        lines.append(
            f"| {kind} | {', '.join(ms for ms, _ in cells)} | {', '.join(r for _, r in cells)} |"
        )
    return "\n".join(lines)


def test_the_benchmarks_page_shows_the_committed_methods_runs():
    directory = os.path.join(REPO, "results", "bench")
    paths = sorted(
        os.path.join(directory, name)
        for name in os.listdir(directory)
        if name.startswith("methods_run")
    )
    assert len(paths) == 2
    page = open(os.path.join(REPO, "docs", "how-to", "benchmarks.md")).read()
    assert methods_table(paths) in page
