#!/usr/bin/env python3
"""Turns bitnet_bench JSON (--benchmark_out=FILE --benchmark_repetitions=N) into the ratio table of
docs/benchmarks.md: BitLinear speedup over Eigen float32 measured in the same run.

One-thread rows compare CPU times (robust to other load on a shared machine); two-thread rows
compare wall-clock times, as does the "2 thr / 1 thr" column. Medians when repetitions were run.
"""
import json
import sys


def load(path):
    runs = {}
    for b in json.load(open(path))["benchmarks"]:
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
            continue
        name = b["run_name"] if "run_name" in b else b["name"]
        runs[name] = (b["real_time"], b["cpu_time"])
    return runs


def main(path):
    runs = load(path)
    isas = sorted({n.split("/")[0][len("bitlinear_"):] for n in runs if n.startswith("bitlinear_")})
    print("| out x in | batch | Eigen f32 (us) | " + " | ".join(
        f"{i} 1 thr (us) | {i} speedup 1 thr | {i} speedup 2 thr | {i} 2 thr / 1 thr" for i in isas) + " |")
    print("|---|---|---|" + "---|---|---|---|" * len(isas))
    shapes = []
    for n in runs:
        if n.startswith("eigen_float32/"):
            out, inp, batch = n.split("/")[1:4]
            shapes.append((int(out), int(inp), int(batch)))
    for out, inp, batch in shapes:
        eigen_real, eigen_cpu = runs[f"eigen_float32/{out}/{inp}/{batch}/1"]
        cells = [f"{out}x{inp}", str(batch), f"{eigen_cpu:.0f}"]
        for i in isas:
            one = runs.get(f"bitlinear_{i}/{out}/{inp}/{batch}/1")
            two = runs.get(f"bitlinear_{i}/{out}/{inp}/{batch}/2")
            if not one:
                cells += ["-"] * 4
                continue
            cells += [f"{one[1]:.0f}", f"{eigen_cpu / one[1]:.1f}x",
                      f"{eigen_real / two[0]:.1f}x" if two else "-",
                      f"{one[0] / two[0]:.2f}x" if two else "-"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
