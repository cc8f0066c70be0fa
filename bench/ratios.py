#!/usr/bin/env python3
"""Ratio tables of docs/benchmarks.md from Google Benchmark JSON files of one session:

    python3 bench/ratios.py bitnet.json eigen_native.json

bitnet.json from bitnet_bench (BitLinear per ISA and Eigen float32, both without -march flags),
eigen_native.json from bitnet_bench_eigen_native (Eigen float32 built -O3 -march=native). One table
per kernel ISA: BitLinear's time with 1 and 2 threads and its speedup over both Eigen builds.
Medians when the files hold repetitions (--benchmark_repetitions=N). Real (wall-clock) times
throughout: the runs are meant for a quiet machine.
"""
import json
import sys


def load(paths):
    runs = {}
    for path in paths:
        for b in json.load(open(path))["benchmarks"]:
            if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
                continue
            name = b.get("run_name", b["name"])
            runs[name] = b["real_time"]
    return runs


def main(paths):
    runs = load(paths)
    shapes = [tuple(int(v) for v in n.split("/")[1:4]) for n in runs if n.startswith("eigen_float32/")]
    isas = sorted({n.split("/")[0][len("bitlinear_"):] for n in runs if n.startswith("bitlinear_")})
    for isa in isas:
        print(f"\n{isa}:\n")
        print("| out x in | batch | Eigen -march=native (us) | Eigen plain (us) | BitLinear 1 thr (us) "
              "| vs native | vs plain | BitLinear 2 thr (us) | 2 thr vs native | 2 thr / 1 thr |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for out, inp, batch in shapes:
            key = f"{out}/{inp}/{batch}"
            native = runs.get(f"eigen_float32_native/{key}/1")
            plain = runs[f"eigen_float32/{key}/1"]
            one = runs.get(f"bitlinear_{isa}/{key}/1")
            two = runs.get(f"bitlinear_{isa}/{key}/2")
            if one is None:
                continue
            cell = lambda v: f"{v:.1f}" if v < 100 else f"{v:.0f}"
            print("| " + " | ".join([
                f"{out}x{inp}", str(batch), cell(native) if native else "-", cell(plain), cell(one),
                f"{native / one:.1f}x" if native else "-", f"{plain / one:.1f}x",
                cell(two) if two else "-", f"{native / two:.1f}x" if native and two else "-",
                f"{one / two:.2f}x" if two else "-"]) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
