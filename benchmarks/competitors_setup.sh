#!/usr/bin/env bash
# Set up the competitors of benchmarks/competitors.py (idempotent):
#  1. openvino-genai + openvino-tokenizers of the project venv's OpenVINO version, into the project venv, only
#     if pip's dry run shows they add nothing else (else into their own venv $VENVS/genai: pass
#     --genai-python $VENVS/genai/bin/python to competitors.py);
#  2. optimum-intel in its own venv ($VENVS/optimum): optimum-intel 2.2 pins huggingface-hub < 1.22 while the
#     project's diffusers 0.42 needs >= 1.32. torch is pinned to the project's CPU build (2.13.0; unpinned,
#     pip pulls a multi-GB CUDA build), openvino to the project's version; pip resolves diffusers 0.39.0 and
#     transformers 5.5.4 there. torchvision (a dependency of optimum-intel) comes from PyPI as a CUDA build
#     that cannot load against the CPU torch ("operator torchvision::nms does not exist", which breaks
#     transformers' imports); nothing text-to-image needs it, so it is removed;
#  3. stable-diffusion.cpp through stable-diffusion-cpp-python, built from source by pip (CMake, a CPU build:
#     ggml's CPU backend with -march=native, OpenMP) in its own venv ($VENVS/sdcpp). Measured on 2 shared cores
#     of the dev machine: see benchmarks/README.md (build minutes, venv size).
# Usage: bash benchmarks/competitors_setup.sh   (env: MAIN_PY=.venv/bin/python VENVS=/work/venvs PY=python3.11)
set -euo pipefail
cd "$(dirname "$0")/.."
MAIN_PY=${MAIN_PY:-.venv/bin/python}
VENVS=${VENVS:-/work/venvs}
PY=${PY:-python3.11}
TORCH=${TORCH:-2.13.0}
OPTIMUM_INTEL=${OPTIMUM_INTEL:-2.2.0}
SDCPP=${SDCPP:-0.4.7}

OV=$("$MAIN_PY" -c "from importlib.metadata import version; print(version('openvino'))")
GENAI="$OV.0"   # openvino-genai / -tokenizers 2026.4.1.0 go with openvino 2026.4.1
echo "project venv: $MAIN_PY, openvino $OV"

# 1. OpenVINO GenAI
if "$MAIN_PY" -c "import openvino_genai, openvino_tokenizers" 2>/dev/null; then
    echo "openvino-genai already in the project venv"
else
    plan=$("$MAIN_PY" -m pip install --dry-run "openvino-genai==$GENAI" "openvino-tokenizers==$GENAI" 2>&1 | grep '^Would install' || true)
    extra=$(echo "$plan" | tr ' ' '\n' | grep -v -E '^(Would|install|openvino-genai-|openvino-tokenizers-|openvino_genai-|openvino_tokenizers-)' | grep -v '^$' || true)
    if [ -n "$plan" ] && [ -z "$extra" ]; then
        "$MAIN_PY" -m pip install -q "openvino-genai==$GENAI" "openvino-tokenizers==$GENAI"
    else
        echo "openvino-genai would change other packages of the project venv ($extra): own venv $VENVS/genai"
        test -x "$VENVS/genai/bin/python" || "$PY" -m venv "$VENVS/genai"
        "$VENVS/genai/bin/python" -m pip install -q "openvino==$OV" "openvino-genai==$GENAI" "openvino-tokenizers==$GENAI" numpy
        echo "pass --genai-python $VENVS/genai/bin/python to competitors.py"
    fi
fi

# 2. optimum-intel
O="$VENVS/optimum"
if "$O/bin/python" -c "import optimum.intel, diffusers" 2>/dev/null; then
    echo "optimum-intel already in $O"
else
    mkdir -p "$VENVS"
    test -x "$O/bin/python" || "$PY" -m venv "$O"
    "$O/bin/python" -m pip install -q --upgrade pip
    "$O/bin/python" -m pip install -q "torch==$TORCH"
    "$O/bin/python" -m pip install -q "optimum-intel[openvino,diffusers]==$OPTIMUM_INTEL" "torch==$TORCH" "openvino==$OV"
    "$O/bin/python" -m pip uninstall -q -y torchvision || true
fi
"$O/bin/python" - <<'EOF'
from importlib.metadata import version
print("optimum venv:", ", ".join(f"{n} {version(n)}" for n in ("optimum-intel", "optimum", "openvino", "openvino-tokenizers",
      "nncf", "diffusers", "transformers", "huggingface-hub", "torch")))
EOF
# 3. stable-diffusion.cpp
S="$VENVS/sdcpp"
if "$S/bin/python" -c "import stable_diffusion_cpp" 2>/dev/null; then
    echo "stable-diffusion-cpp-python already in $S"
else
    mkdir -p "$VENVS"
    test -x "$S/bin/python" || "$PY" -m venv "$S"
    "$S/bin/python" -m pip install -q --upgrade pip
    t0=$(date +%s)
    CMAKE_ARGS=${SDCPP_CMAKE_ARGS:-"-DGGML_NATIVE=ON -DSD_CUDA=OFF -DGGML_OPENMP=ON"} \
        CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
        "$S/bin/python" -m pip install -q --no-binary stable-diffusion-cpp-python "stable-diffusion-cpp-python==$SDCPP" numpy
    echo "stable-diffusion-cpp-python $SDCPP built and installed in $(( $(date +%s) - t0 )) s"
fi
"$S/bin/python" -c "from importlib.metadata import version as v; import stable_diffusion_cpp as s; print('sdcpp venv: stable-diffusion-cpp-python', v('stable-diffusion-cpp-python'), 'numpy', v('numpy'))"
"$MAIN_PY" -c "from importlib.metadata import version as v; print('project venv: openvino-genai', v('openvino-genai'), 'diffusers', v('diffusers'), 'huggingface-hub', v('huggingface-hub'))" 2>/dev/null || true
