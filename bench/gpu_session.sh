#!/usr/bin/env bash
# One lent GPU session (the `device` tool, an H200), run in the repository root there, with `.gpu`
# (bench/gpu_pack.py pack, given the same configs) and `.whl` carried: the wheels its image lacks, for its
# Python 3.12, from
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       --platform manylinux_2_28_x86_64 -d .whl pydantic pydantic_core annotated_types typing_inspection \
#       typing_extensions jiwer rapidfuzz faker
# and models/ left out of the tree that travels (the tool's 64 MiB limit).
#   bash bench/gpu_session.sh smoke CONFIG       # GPU recognition benchmarks (issue 16) and 150 training steps, timed
#   bash bench/gpu_session.sh train CONFIG...    # each config in turn, each model back in $OUT/<its folder name>
# STEPS=N overrides the configs' steps (size a run from the smoke run's seconds per step); TRAIN_SECONDS caps
# each config's training (the best model so far is kept), so their sum must fit the tool's call. A config
# whose base is an earlier config's output trains from that output. Exits 1 if a training fails (not on
# its time cap). Tried on the CPU first with DEVICE=cpu PYTHON=.venv/bin/python (fp32, a few lines and steps).
set -uo pipefail
mode=${1:?smoke or train}
shift
[ $# -ge 1 ] || { echo "give the training config(s)"; exit 2; }
out=${OUT:-out/gpu-session}
python=${PYTHON:-python3}
device=${DEVICE:-cuda}
mkdir -p "$out"
if [ "$device" = cuda ]; then
    $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
    for fonts in .gpu/fonts-*.tgz; do tar xzf "$fonts" -C /; done
    mkdir -p ../shared/data/train && tar xzf .gpu/lines.tgz -C ../shared/data/train
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    precisions="fp16 bf16" lines=1024 batch=256 smoke_steps=150
else
    precisions=fp32 lines=16 batch=8 smoke_steps=4
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
$python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
setting() { $python -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[2]))[sys.argv[1]])" "$1" "$2"; }
trained=" "

for source in "$@"; do
    name=$(basename "$source" .yaml)
    base=$(setting base_model "$source")
    case "$trained" in
        *" $base "*) echo "$name starts from $base, trained above" ;;
        *) $python bench/gpu_pack.py restore ".gpu/base/$(basename "$base")" "$base" || exit 1 ;;
    esac
    config=/tmp/$name.yaml
    sed -e "s/^device: .*/device: $device/" "$source" > "$config"
    [ "$device" = cuda ] || sed -i -e 's/^precision: .*/precision: fp32/' -e 's/^loader_workers: .*/loader_workers: 1/' \
        -e 's/^batch_size: .*/batch_size: 4/' "$config"
    if [ "$mode" = smoke ]; then
        for precision in $precisions; do
            timeout 120 $python bench/recognize.py --model random-base --device $device --precision $precision \
                --max-new-tokens 24 --lines $lines --batch-size $batch --no-naive 2>&1 | grep -v Warning
        done
        timeout 90 $python bench/recognize.py --model "$base" --device $device --precision ${precisions%% *} \
            --real ../shared/data/train/val --lines $((lines / 2)) --batch-size $batch --no-naive 2>&1 | grep -v Warning
        sed -i -e "s/^steps: .*/steps: $smoke_steps/" -e "s/^validate_every: .*/validate_every: $smoke_steps/" \
            -e 's|^output_dir: .*|output_dir: out/gpu-smoke|' -e 's|^work_dir: .*|work_dir: out/train-gpu-smoke|' "$config"
    elif [ -n "${STEPS:-}" ]; then
        sed -i "s/^steps: .*/steps: $STEPS/" "$config"
    fi
    model=$(setting output_dir "$config")
    start=$(date +%s)
    timeout "${TRAIN_SECONDS:-480}" $python -m pipeline.cli train --config "$config" --no-progress 2>&1 | grep -v Warning
    status=${PIPESTATUS[0]}
    echo "training $name ($mode): $(( $(date +%s) - start )) s for $(grep '^steps:' "$config"), exit $status"
    if [ "$status" -ne 0 ] && [ "$status" -ne 124 ]; then
        echo "training $name failed: nothing shipped, later configs not run"
        exit 1
    fi
    $python bench/gpu_pack.py ship "$model" "$out/$(basename "$model")" && ls -la "$out/$(basename "$model")" || exit 1
    trained="$trained$model "
    if [ "$mode" = smoke ]; then
        break
    fi
done
