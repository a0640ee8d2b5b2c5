#!/usr/bin/env bash
# The committed SD 1.5 CPU reports: the real SD 1.5 UNet/VAE/text-encoder configs with random
# weights (demo:sd15-full), ONNX Runtime CPU engine vs PyTorch eager, at 256x256 and 512x512.
# About 40 minutes on 2 cores. Run from the repository root after `make setup`.
set -euo pipefail
BIN=${BIN:-.venv/bin}
$BIN/lcm-export build-engine --base demo:sd15-full --resolution 256x256 --resolution 512x512 --engine-dir engines/demo-sd15-full
$BIN/lcm-export bench --engine-dir engines/demo-sd15-full --resolution 256x256 --baselines eager --runs 5 --warmup 1 --solver-runs 1 --out benchmarks/reports/sd15-cpu-256
$BIN/lcm-export bench --engine-dir engines/demo-sd15-full --resolution 512x512 --baselines eager --runs 3 --warmup 1 --solver-runs 1 --out benchmarks/reports/sd15-cpu-512
$BIN/python benchmarks/ort_settings.py engines/demo-sd15-full --resolution 256x256 --runs 3 --out benchmarks/reports/ort-settings-256
