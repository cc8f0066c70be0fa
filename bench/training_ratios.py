#!/usr/bin/env python3
"""Turns bitnet_bench_training JSON (--benchmark_out=FILE --benchmark_repetitions=N) into the table of
docs/fine-tuning.md and docs/benchmarks.md: BitLinear's training forward and backward against the
float Linear's in Eigen, and set_weight against a training step, all from the same run. CPU times
(1 thread; robust to other load on a shared machine), medians when repetitions were run."""
import json
import sys


def load(path):
    runs = {}
    for b in json.load(open(path))["benchmarks"]:
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
            continue
        runs[b.get("run_name", b["name"])] = b["cpu_time"]  # microseconds (the benchmarks' unit)
    return runs


def main(path):
    runs = load(path)
    print("| out x in | batch | float fwd (us) | float bwd (us) | BitLinear train_forward λ=1 (us) | λ=0.5 (us) "
          "| BitLinear backward (us) | backward / float backward | step: BitLinear / float | set_weight (us) "
          "| set_weight / BitLinear step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    shapes = sorted({tuple(int(v) for v in n.split("/")[1:4]) for n in runs if n.startswith("float_backward/")},
                    key=lambda s: (s[0] * s[1], s[2]))
    for out, inf, batch in shapes:
        key = f"{out}/{inf}/{batch}"
        ff, fb = runs[f"float_forward/{key}"], runs[f"float_backward/{key}"]
        tf1, tf05 = runs[f"bitlinear_train_forward/{key}/100"], runs[f"bitlinear_train_forward/{key}/50"]
        bb = runs[f"bitlinear_backward/{key}"]
        sw = runs[f"bitlinear_set_weight/{out}/{inf}"]
        print(f"| {out}x{inf} | {batch} | {ff:.0f} | {fb:.0f} | {tf1:.0f} | {tf05:.0f} | {bb:.0f} | {bb / fb:.2f}x "
              f"| {(tf1 + bb) / (ff + fb):.2f}x | {sw:.0f} | {sw / (tf1 + bb):.2f} |")


if __name__ == "__main__":
    main(sys.argv[1])
