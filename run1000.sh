#!/usr/bin/env bash
# The ~$1000 tier: a d32 model (~1.9B parameters) with the speedrun's pipeline, about 40 hours on
# 8 H100s. 20 tokens per parameter is ~38B tokens, ~180B characters: 800 shards, with margin. The
# per-GPU batch (--device_batch_size=auto) is the most that fits beside the bigger model; the total
# batch stays 0.5M tokens per step (gradient accumulation makes up the difference). Same settings
# and resuming as speedrun.sh.
set -euo pipefail
cd "$(dirname "$0")"
export DEPTH="${DEPTH:-32}" SHARDS="${SHARDS:-800}"
exec bash speedrun.sh
