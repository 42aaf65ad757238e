"""The benchmark results as Markdown tables."""

from __future__ import annotations

from collections.abc import Sequence


def _fmt(value, digits=2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _update_time_table(cases, key: str, name: str, *, with_k: bool) -> str:
    """The rows of `noise_kinds.update_time_rows` of each case (`case[key]`) as one table."""
    k_header = ["k"] if with_k else []
    return _table(
        ["model", "B", "XLA", *k_header, name, "update ms", "ratio", "overhead %"],
        [
            [c["model"], c["batch_size"], _fmt(c["xla"]),
             *([c["accumulation_steps"]] if with_k else []), row["kind"],
             _fmt(row["update_ms"]), _fmt(row["ratio"], 3), _fmt(row["overhead_pct"], 1)]
            for c in cases
            for row in c[key]
        ],
    )  # fmt: skip


def format_tables(results: dict) -> str:
    """The results as Markdown tables, one per part present."""
    out = []
    noise = results.get("noise")
    if noise:
        out.append("### Noise overhead (NoisyOptimizer vs inner alone, one device)\n")
        out.append(
            _table(
                ["model", "B", "optimizer", "XLA", "bare ms", "noisy ms", "ratio",
                 "overhead %", "overhead ns/param", "floor ns/param", "vs floor"],
                [
                    [c["model"], c["batch_size"], c["optimizer"], _fmt(c["xla"]),
                     _fmt(c["bare_ms"]), _fmt(c["noisy_ms"]), _fmt(c["ratio"], 3),
                     _fmt(c["overhead_pct"], 1), _fmt(c["overhead_ns_per_param"], 1),
                     _fmt(c["floor_philox_ns_per_param"], 1), _fmt(c["overhead_vs_floor"], 2)]
                    for c in noise["cases"]
                ],
            )
        )  # fmt: skip
        out.append("\n\nFloors, ns per parameter (medians; the draw written to memory):\n")
        out.append(
            _table(
                ["params", "XLA", "unit_noise (ours)", "stateless_normal philox",
                 "stateless_normal auto_select", "elementwise pass", "ours / philox"],
                [
                    [f["params"], _fmt(f["xla"]), _fmt(f["unit_noise_ns_per_param"], 1),
                     _fmt(f["philox_ns_per_param"], 1), _fmt(f["auto_select_ns_per_param"], 1),
                     _fmt(f["elementwise_ns_per_param"], 1), _fmt(f["unit_noise_vs_philox"], 2)]
                    for f in noise["floors"]
                ],
            )
        )  # fmt: skip
        out.append("\n")
    kinds = results.get("noise_kinds")
    if kinds:
        out.append("\n### Noise kinds through the engine (one device): update time vs none\n")
        out.append(_update_time_table(kinds["cases"], "kinds", "kind", with_k=True))
        out.append("\n")
    compared = results.get("methods")
    if compared:
        out.append("\n### Compared methods through the engine (one device): update time vs SGD\n")
        out.append(_update_time_table(compared["cases"], "methods", "method", with_k=False))
        out.append("\n")
    engine = results.get("engine")
    if engine:
        for case in engine["cases"]:
            out.append(
                f"\n### Engine throughput: {case['model']}, global batch "
                f"{case['global_batch_size']}\n"
            )
            out.append(
                _table(
                    ["configuration", "replicas", "step ms", "examples/s"],
                    [
                        [r["description"], r["replicas"], _fmt(r["step_ms"]),
                         _fmt(r["examples_per_s"], 0)]
                        for r in case["configs"]
                    ],
                )
            )  # fmt: skip
            ratios = [f"{key}: {case[key]:.2f}x" for key in case if key.startswith("engine_")]
            out.append("\n" + "; ".join(ratios) + "\n")
    tta = results.get("time_to_accuracy")
    if tta:
        for task_result in tta["tasks"]:
            task = task_result["task"]
            out.append(
                f"\n### Time to {task['target_accuracy']:.0%} validation accuracy: "
                f"{task['dataset']} ({task['model']})\n"
            )
            rows = []
            for s in task_result["summary"]:
                t, n, best = s["time_to_target_s"], s["steps_to_target"], s["best_val_accuracy"]
                rows.append(
                    [
                        s["config"],
                        s["epochs"],
                        f"{s['reached']}/{s['seeds']}",
                        f"{_fmt(t['median'], 1)} [{_fmt(t['min'], 1)}, {_fmt(t['max'], 1)}]",
                        f"{_fmt(n['median'], 0)} [{_fmt(n['min'], 0)}, {_fmt(n['max'], 0)}]",
                        _fmt(best["median"], 3),
                    ]
                )
            out.append(
                _table(
                    ["config", "epochs", "reached", "time s, median [min, max]",
                     "steps, median [min, max]", "best val acc (median)"],
                    rows,
                )
            )  # fmt: skip
            out.append("\n")
    gpu_check = results.get("gpu_check")
    if gpu_check:
        devices = ", ".join(gpu_check["gpus"]) or "no GPU: logical CPU devices"
        out.append(
            f"\n### GPU check: MirroredStrategy + per-replica XLA, {gpu_check['precision']} "
            f"({devices})\n"
        )
        rows = []
        for c in gpu_check["cases"]:
            t = {r["config"]: r["examples_per_s"] for r in c["throughput"]["configs"]}
            rows.append(
                [c["model"], c["replicas"], c["global_batch_size"], _fmt(c["xla_compiled"]),
                 _fmt(c["replicas_identical"]), _fmt(c["loss_finite"]), _fmt(c["loss_scaled"]),
                 _fmt(t.get("engine_mirrored_xla"), 0), _fmt(t.get("keras_mirrored"), 0),
                 _fmt(t.get("keras_single_xla"), 0),
                 _fmt(c["throughput"].get("engine_vs_keras_mirrored")),
                 _fmt(c["throughput"].get("engine_vs_keras_single_xla"))]
            )  # fmt: skip
        out.append(
            _table(
                ["model", "replicas", "B", "XLA compiled", "replicas identical", "loss finite",
                 "loss scaled", "engine ex/s", "Keras mirrored ex/s", "Keras 1-device XLA ex/s",
                 "engine / Keras mirrored", "engine / Keras 1-device XLA"],
                rows,
            )
        )  # fmt: skip
        if gpu_check["failed"]:
            out.append(f"\nFAILED: {', '.join(gpu_check['failed'])}")
        out.append("\n")
    memory = results.get("memory")
    if memory:
        out.append("\n### Peak resident memory (training process, no XLA)\n")
        out.append(
            _table(
                ["model", "B", "params", "bare MiB", "noisy MiB", "ratio", "delta MiB"],
                [
                    [c["model"], c["batch_size"], c["params"], _fmt(c["bare_mb"], 0),
                     _fmt(c["noisy_mb"], 0), _fmt(c["ratio"], 3), _fmt(c["delta_mb"], 1)]
                    for c in memory["cases"]
                ],
            )
        )  # fmt: skip
        out.append("\n")
    inputs = results.get("input")
    if inputs:
        model = inputs["model"]
        out.append(
            f"\n### Streamed folder input vs the model's step rate ({inputs['cores']} cores)\n"
        )
        out.append(
            _table(
                ["preprocess", "px", "threads", "images/s", "images/s per thread",
                 f"threads to feed {model['model']}"],
                [
                    [r["preprocess"], r["image_size"], r["threads"], _fmt(r["images_per_s"], 1),
                     _fmt(r["images_per_s_per_thread"], 1), _fmt(r["cores_to_feed_model"], 2)]
                    for r in inputs["throughput"]
                ],
            )
        )  # fmt: skip
        out.append(
            f"\n{model['model']} at {model['image_size']} px, batch {model['batch_size']}: "
            f"{model['images_per_s']:.1f} training images/s ({model['step_ms']:.0f} ms per step)\n"
        )
        out.append("\n### Peak resident memory of a one-epoch main-job run (mlp)\n")
        out.append(
            _table(
                ["images", "px", "streaming", "peak MiB"],
                [
                    [m["images"], m["image_size"], m["streaming"], _fmt(m["peak_mb"], 0)]
                    for m in inputs["memory"]
                ],
            )
        )
        growth = inputs["memory_growth_mb"]
        words = {"true": "streamed", "false": "in memory"}
        changes = ", ".join(f"{words[mode]} {mb:+.0f} MiB" for mode, mb in growth.items())
        out.append(f"\nGrowth from the smaller to the larger set: {changes}\n")
    return "\n".join(out)
