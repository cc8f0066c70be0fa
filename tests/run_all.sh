#!/usr/bin/env bash
# The whole test suite, as CI runs it:
#   1. dev:      -Wall -Wextra -Werror build, every public header compiled alone, all tests,
#                examples, and the find_package / FetchContent consumer projects;
#   2. sanitize: the same tests under AddressSanitizer + UndefinedBehaviorSanitizer;
#   3. tsan:     the concurrency tests (concurrent forward, thread counts) under ThreadSanitizer.
set -euo pipefail
cd "$(dirname "$0")/.."
for preset in dev sanitize tsan; do
  echo "=== bitnet tests: workflow '${preset}'"
  cmake --workflow --preset "${preset}"
done
echo "=== bitnet tests: all workflows passed"
