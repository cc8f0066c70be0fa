#!/usr/bin/env bash
# The whole test suite, as CI runs it:
#   1. dev:      -Wall -Wextra -Werror build, every public header compiled alone, all tests,
#                examples, and the find_package / FetchContent consumer projects;
#   2. sanitize: the same tests under AddressSanitizer + UndefinedBehaviorSanitizer, built with
#                clang++-14 (dev builds with GCC; the header checks, examples, the command-line
#                tool and the consumer projects, which exercise packaging rather than memory
#                safety, are left to dev);
#   3. tsan:     the concurrency tests (concurrent forward, thread counts) under ThreadSanitizer,
#                built from the few test files that run threads (BITNET_THREAD_TESTS_ONLY).
#   4. arm:      when g++-aarch64-linux-gnu and qemu-aarch64 are installed, the kernel, packing and
#                BitLinear tests cross-built for AArch64 and run under qemu-user on CPUs with and
#                without SDOT / SMMLA (about 3-4 minutes on 2 cores).
#   5. fuzz:     when clang++-14 is installed, libFuzzer runs (ASan + UBSan) of the safetensors reader
#                and the GGUF reader, 35 s each, seeded with tests/safetensors_corpus and tests/gguf_corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
for preset in dev sanitize tsan; do
  echo "=== bitnet tests: workflow '${preset}'"
  cmake --workflow --preset "${preset}"
done
if command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 && command -v qemu-aarch64 >/dev/null 2>&1; then
  echo "=== bitnet tests: workflow 'arm' (AArch64 cross build, kernels under qemu-user)"
  cmake --workflow --preset arm
else
  echo "=== bitnet tests: g++-aarch64-linux-gnu or qemu-aarch64 not found, skipping the emulated ARM stage"
fi
if command -v clang++-14 >/dev/null 2>&1; then
  echo "=== bitnet tests: fuzzing the safetensors and GGUF readers, 35 s each (clang++-14, libFuzzer + ASan + UBSan)"
  cmake --preset fuzz >/dev/null
  cmake --build --preset fuzz
  for format in safetensors gguf; do
    corpus="build/fuzz/corpus-${format}"  # the seeds plus what the fuzzer finds; the repository corpus stays as is
    rm -rf "${corpus}"
    mkdir -p "${corpus}"
    cp "tests/${format}_corpus/valid/"* "tests/${format}_corpus/invalid/"* "${corpus}/"
    "build/fuzz/tests/fuzz_${format}" -max_total_time=35 -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
      "-dict=tests/fuzz/${format}.dict" -print_final_stats=1 "${corpus}"
  done
else
  echo "=== bitnet tests: clang++-14 not found, skipping the fuzz runs"
fi
echo "=== bitnet tests: all workflows passed"
