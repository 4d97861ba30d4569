#!/bin/bash
# The runs behind README.md (about 15 minutes on 2 cores; keep the machine otherwise idle).
cd "$(dirname "$0")/../../.."  # the repository root
OUT=bench/results/2026-12-07-sampling
G=$(.venv/bin/python -m bench.models gemma3 | cut -f2)
for m in smollm2 gemma3; do
  M=""; [ $m = gemma3 ] && M=$G
  for s in greedy min-p top-k rep-pen; do
    .venv/bin/python -m bench.overhead $M --threads 1 --peer --wake-floor --repeats 6 --sampling $s --json $OUT/peer-$m-$s.json > $OUT/peer-$m-$s.txt 2>&1
    .venv/bin/python -m bench.overhead $M --threads 1 --compare-shortcuts --repeats 6 --sampling $s --json $OUT/shortcuts-$m-$s.json > $OUT/shortcuts-$m-$s.txt 2>&1
  done
done
F=$(.venv/bin/python -c "from bench.models import fast; print(fast().path)")
.venv/bin/python -m bench.overhead $F --threads 1 --peer --wake-floor --repeats 6 --tokens 1024 --ctx-size 8192 --json $OUT/peer-fast-greedy.json > $OUT/peer-fast-greedy.txt 2>&1
.venv/bin/python -m bench.overhead --threads 1 --peer --wake-floor --repeats 6 --streams 4 --json $OUT/peer-smollm2-greedy-4streams.json > $OUT/peer-smollm2-greedy-4streams.txt 2>&1
.venv/bin/python -m bench.run --models fast --scenarios single,concurrency --rounds 4 --gen-tokens 1024 --ctx-size 16384 --out bench/results/2026-12-07-fast > /tmp/fastbench-final.log 2>&1
