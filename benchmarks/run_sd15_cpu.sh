#!/usr/bin/env bash
# The committed CPU reports. The real SD 1.5 UNet/VAE/text-encoder configs with random weights
# (demo:sd15-full): ONNX Runtime CPU engine vs PyTorch eager at 256x256 and 512x512; the ONNX
# Runtime settings study; where the UNet step's time goes (profiles); attention fusion on/off; the
# SDXL-config UNet at 512x512 and 1024x1024. About 2 hours on 2 cores of an Intel Xeon. Run from the repository root after `make setup`.
set -euo pipefail
BIN=${BIN:-.venv/bin}
$BIN/lcm-export build-engine --base demo:sd15-full --resolution 256x256 --resolution 512x512 --engine-dir engines/demo-sd15-full
$BIN/lcm-export bench --engine-dir engines/demo-sd15-full --resolution 256x256 --baselines eager --runs 7 --warmup 1 --solver-runs 1 --out benchmarks/reports/sd15-cpu-256
$BIN/lcm-export bench --engine-dir engines/demo-sd15-full --resolution 512x512 --baselines eager --runs 3 --warmup 1 --solver-runs 1 --out benchmarks/reports/sd15-cpu-512
$BIN/python benchmarks/unet_profile.py --engine-dir engines/demo-sd15-full --resolution 256x256 --runs 3 --out benchmarks/reports/unet-profile-256
$BIN/python benchmarks/unet_profile.py --engine-dir engines/demo-sd15-full --resolution 512x512 --runs 2 --out benchmarks/reports/unet-profile-512
test -f out/sd15-full-onnx/unet/model.onnx || $BIN/lcm-export export --model demo:sd15-full --out out/sd15-full-onnx --resolution 256x256 --quiet
$BIN/python benchmarks/ort_settings.py out/sd15-full-onnx/unet/model.onnx --resolution 256x256 --runs 2 --rounds 3 --out benchmarks/reports/ort-settings-256
$BIN/python benchmarks/attention_ab.py out/sd15-full-onnx/unet/model.onnx --resolutions 256x256,512x512 --runs 2 --rounds 3 --out benchmarks/reports/attention-fusion
$BIN/python benchmarks/sdxl_unet_cpu.py --resolutions 512x512,1024x1024 --runs 3 --work out/sdxl-unet --out benchmarks/reports/sdxl-unet-cpu
$BIN/python benchmarks/attention_ab.py out/sdxl-unet/onnx/unet/model.onnx --resolutions 1024x1024,512x512 --runs 1 --rounds 3 --one-at-a-time --out benchmarks/reports/attention-fusion-sdxl
