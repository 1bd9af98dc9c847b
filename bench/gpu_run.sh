#!/usr/bin/env bash
# The GPU checks of issues 14 and 16 in two device calls of under 10 minutes, most important first.
#
# A GPU machine is lent briefly (15 minutes in all, start included), so everything is prepared
# here first and each call runs one part; every check writes its JSON line to $OUT/<check>.json
# as soon as it ends, so a part cut short still returns what it finished.
#
#   bash bench/gpu_run.sh prepare        # here, once: wheels for the device's Python 3.12 into
#                                        # .whl/ and ComfyUI's *.py files from $COMFYUI_DIR into
#                                        # .comfyui/ (both git-ignored through .git/info/exclude)
#   bash bench/gpu_run.sh 1              # on the device: carry [".whl", ".comfyui"], timeout 590
#   bash bench/gpu_run.sh 2              # the second call (same carry)
#   DRY=1 bash bench/gpu_run.sh 1        # here: every check's --cpu-dry-run (wiring only)
#
# Part 1 (issue 14's and 16's targets): the fused attention kernel at Large dimensions; Large
# under ComfyUI with 12 GB usable (random fp8-scaled checkpoint, auto and fp8 + blocks); peak
# VRAM and s/step of each weights x offload at 1024², 28 steps.
# Part 2: Medium under ComfyUI with 8 GB usable; Medium's weights x offload; compiled blocks at
# Large's dimensions (2 blocks, 1024², bf16); the training recipe; last, the same blocks with fp8
# weights (may be cut off by the call's 590 s: it loses only itself).
#
# The device image (Python 3.12, torch 2.11) has accelerate, transformers, safetensors,
# matplotlib and a peft of its own (ours is carried to match) but not diffusers, kornia (training's augmentation) or av
# (ComfyUI's comfy_api imports it): those travel as wheels (48 MB; with .comfyui and the repo
# ~62 MB of the 64 MiB a call may carry — check `du` after adding anything).
set -u
cd "$(dirname "$0")/.."
part="${1:-1}"
OUT="${OUT:-bench/gpu_out}"
mkdir -p "$OUT"
WHEELS="diffusers==0.42.1 importlib_metadata==10.2.0 peft==0.21.2 av==19.0.2 kornia==0.9.0 kornia_rs==0.2.0"

if [ "$part" = prepare ]; then
    set -e
    mkdir -p .git/info
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
    grep -qx '/.comfyui/' .git/info/exclude 2>/dev/null || echo '/.comfyui/' >>.git/info/exclude
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $WHEELS
    : "${COMFYUI_DIR:?set COMFYUI_DIR to a ComfyUI checkout (0.3.64 or later)}"
    rm -rf .comfyui && mkdir .comfyui
    (cd "$COMFYUI_DIR" && find . -name '*.py' -not -path './.git/*' -not -path './tests*' \
        -not -path './custom_nodes/*' -not -path './comfy_api_nodes/*' -print0 |
        xargs -0 cp --parents -t "$OLDPWD/.comfyui")
    du -sh .whl .comfyui
    exit 0
fi

if [ -n "${DRY:-}" ]; then
    dry=(--cpu-dry-run)
    comfy="${COMFYUI_DIR:-.comfyui}"
    py="${COMFYUI_PYTHON:-python3}"
else
    dry=()
    comfy=.comfyui
    py=python3
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/gpu.txt" 2>&1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

check() {  # check NAME SECONDS COMMAND...: its last stdout line to $OUT/NAME.json, its log beside it
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%T), limit ${limit}s)"
    timeout "$limit" "$@" >"$OUT/$name.out" 2>"$OUT/$name.log"
    echo "   exit $?"
    tail -n 1 "$OUT/$name.out" >"$OUT/$name.json"
    cat "$OUT/$name.json"
}

case "$part" in
1)
    check attention_large 90 "$py" bench/gpu_attention_check.py --repeats 20 "${dry[@]}"
    check memory_large 230 "$py" bench/gpu_memory_check.py --family sd3.5-large "${dry[@]}"
    ;;
2)
    check memory_medium 120 "$py" bench/gpu_memory_check.py --family sd3.5-medium \
        --variants bf16:none,fp8_e4m3fn:none,fp8_e4m3fn:blocks "${dry[@]}"
    if [ -n "${DRY:-}" ]; then  # bench_compile has no dry run: its CPU run is the dry run
        check compile_large_blocks 150 python3 bench/bench_compile.py --family sd3.5-medium --layers 2 \
            --size 16 --repeats 2
    else
        check compile_large_blocks 150 python3 bench/bench_compile.py --device cuda --dtype bf16 \
            --family sd3.5-large --layers 2 --size 128 --repeats 5
    fi
    check train_large 160 "$py" bench/gpu_train_check.py --steps 6 "${dry[@]}"
    # Last, as it may not fit the call's 590 s (a cut-off check loses only itself): fp8 storage
    # compiled, the 12 GB card's setting.
    if [ -n "${DRY:-}" ]; then
        check compile_large_fp8 100 python3 bench/bench_compile.py --family sd3.5-medium --layers 2 \
            --size 16 --repeats 2 --dtype bf16 --weights fp8_e4m3fn
    else
        check compile_large_fp8 100 python3 bench/bench_compile.py --device cuda --dtype bf16 \
            --weights fp8_e4m3fn --family sd3.5-large --layers 2 --size 128 --repeats 5
    fi
    ;;
3)
    # The native ComfyUI route against the HAIRDIFF_MODEL route (issue 22's targets), and the
    # native graph through a --lowvram server (ComfyUI refuses --lowvram on a CPU).
    COMFYUI_DIR="$comfy" check native_route 300 "$py" bench/bench_native.py --repeats 3
    COMFYUI_DIR="$comfy" check native_reference_large 200 "$py" bench/bench_native_reference.py --blocks 4 \
        --steps-lo 2 --steps-hi 6 --repeats 2
    COMFYUI_DIR="$comfy" COMFYUI_PYTHON="$py" check native_lowvram 240 "$py" -m pytest -q -x \
        tests/test_comfyui_server.py -k "native_graph"
    ;;
*)
    echo "usage: bash bench/gpu_run.sh prepare|1|2|3" >&2
    exit 2
    ;;
esac
