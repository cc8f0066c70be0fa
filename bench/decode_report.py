#!/usr/bin/env python3
"""Tables of docs/benchmarks.md from one session's model-sized decode run:

    python3 bench/decode_report.py decode.json [eigen_native.json]

decode.json from bitnet_bench_decode, eigen_native.json from bitnet_bench_eigen_native (Eigen float32
-O3 -march=native, the same layer shapes). Medians when the files hold repetitions.
"""
import json
import sys

# One block's projections (out, in): q, k, v, o, gate, up, down; the stack has 30 blocks.
BLOCK = [(2560, 2560), (640, 2560), (640, 2560), (2560, 2560), (6912, 2560), (6912, 2560), (2560, 6912)]
BLOCKS = 30


def load(paths):
    runs = {}
    for path in paths:
        for b in json.load(open(path))["benchmarks"]:
            if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
                continue
            name = b.get("run_name", b["name"]).replace("/manual_time", "")
            name = "/".join(p for p in name.split("/") if not p.startswith("min_time"))
            runs[name] = b
    return runs


def ms(b):
    scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[b["time_unit"]]
    return b["real_time"] * scale


def main(paths):
    runs = load(paths)
    print("| batch | threads | ms / token | floor ms (same rounds) | ratio to floor | tokens/s (linear part) "
          "| GB/s | hot-cache sum ms / token | ratio to hot sum |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch in (1, 8, 32):
        for threads in (1, 2):
            b = runs.get(f"decode_stack/{batch}/{threads}")
            if b is None:
                continue
            hot = [runs.get(f"layer_hot/{o}/{i}/{batch}/{threads}") for o, i in BLOCK]
            hot_ms = BLOCKS * sum(ms(h) for h in hot) / batch if all(hot) else None
            per_token = b["ms_per_token"]
            print("| " + " | ".join([
                str(batch), str(threads), f"{per_token:.2f}", f"{b['floor_ms']:.1f}",
                f"{b['ratio_to_floor']:.2f}x", f"{b['tokens_per_s']:.1f}", f"{b['GB_per_s']:.1f}",
                f"{hot_ms:.2f}" if hot_ms else "-", f"{per_token / hot_ms:.2f}x" if hot_ms else "-"]) + " |")
    print()
    print("| layer (out x in) | batch | hot 1 thr (us) | hot 2 thr (us) | Eigen -march=native 1 thr (us) "
          "| 1 thr vs Eigen | 2 thr vs Eigen |")
    print("|---|---|---|---|---|---|---|")
    for o, i in sorted(set(BLOCK), key=lambda s: (s[1], -s[0])):
        for batch in (1, 8, 32):
            one = runs.get(f"layer_hot/{o}/{i}/{batch}/1")
            two = runs.get(f"layer_hot/{o}/{i}/{batch}/2")
            eigen = runs.get(f"eigen_float32_native/{o}/{i}/{batch}/1")
            if one is None:
                continue
            us = lambda b: 1e3 * ms(b)
            cell = lambda v: f"{v:.1f}" if v < 100 else f"{v:.0f}"
            print("| " + " | ".join([
                f"{o}x{i}", str(batch), cell(us(one)), cell(us(two)) if two else "-",
                cell(us(eigen)) if eigen else "-", f"{us(eigen) / us(one):.1f}x" if eigen else "-",
                f"{us(eigen) / us(two):.1f}x" if eigen and two else "-"]) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
