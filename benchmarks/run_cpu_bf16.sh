#!/usr/bin/env bash
# The committed bf16 CPU reports (issue: bf16 engines on CPU). demo:sd15-full (the real SD 1.5 configs,
# random weights): the default entry on a native-bf16 CPU (OpenVINO bf16) and an ONNX Runtime fp32 entry;
# per-component backend/precision measurements; bench against PyTorch eager fp32, torch.compile and
# PyTorch bf16 at 256x256 and 512x512; the SDXL-config UNet at 1024x1024; cold start; refit vs full build.
# About 1.5 hours on 2 cores of an AMD EPYC Zen 4 (and ~60 GB of disk for the entries).
# Run from the repository root after `make setup`, with nothing else running.
set -euo pipefail
BIN=${BIN:-.venv/bin}
E=${E:-engines}
$BIN/lcm-export build-engine --base demo:sd15-full --resolution 512x512 --resolution 256x256 --engine-dir $E/sd15-full-auto
$BIN/lcm-export build-engine --base demo:sd15-full --resolution 512x512 --resolution 256x256 --backend onnxruntime --engine-dir $E/sd15-full-ort
for R in 512 256; do
  $BIN/python benchmarks/cpu_backends.py --ov-entry $E/sd15-full-auto --ort-entry $E/sd15-full-ort --resolution ${R}x${R} --runs 3 --out benchmarks/reports/cpu-backends-$R
done
$BIN/lcm-export bench --engine-dir $E/sd15-full-auto --resolution 256x256 --baselines eager,compile,bf16 --solvers "" --runs 5 --warmup 1 --out benchmarks/reports/sd15-bf16-256
$BIN/lcm-export bench --engine-dir $E/sd15-full-auto --resolution 512x512 --baselines eager,compile,bf16 --solvers "" --runs 3 --warmup 1 --out benchmarks/reports/sd15-bf16-512
$BIN/python benchmarks/sdxl_unet_cpu.py --resolutions 1024x1024 --paths ort,eager,ov-bf16,torch-bf16 --runs 2 --work out/sdxl-unet --out benchmarks/reports/sdxl-unet-bf16
$BIN/python benchmarks/cold_start.py --engine-dir $E/sd15-full-auto --resolutions 256x256,512x512 --runs 3 --out benchmarks/reports/cold-start-sd15-bf16
$BIN/python benchmarks/refit_bench.py --base demo:sd15-full --resolution 512x512 --work $E/refit --out benchmarks/reports/refit-sd15-512
