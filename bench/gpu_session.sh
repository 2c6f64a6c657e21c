#!/usr/bin/env bash
# One lent GPU session (the `device` tool, an H200), run in the repository root there, with `.gpu`
# (bench/gpu_pack.py pack) and `.whl` carried: the wheels its image lacks, for its Python 3.12, from
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       --platform manylinux_2_28_x86_64 -d .whl pydantic pydantic_core annotated_types typing_inspection \
#       typing_extensions jiwer rapidfuzz faker
# and models/ left out of the tree that travels (the tool's 64 MiB limit).
#   bash bench/gpu_session.sh smoke   # GPU recognition benchmarks (issue 16) and 150 training steps, timed
#   bash bench/gpu_session.sh train   # configs/train-printed-small-gpu.yaml, the model back in $OUT
# STEPS=N overrides the config's steps (size a run from the smoke run's seconds per step). Tried on the CPU first
# with DEVICE=cpu PYTHON=.venv/bin/python (fp32, a few lines and steps).
set -uo pipefail
mode=${1:?smoke or train}
out=${OUT:-out/gpu-session}
python=${PYTHON:-python3}
device=${DEVICE:-cuda}
mkdir -p "$out"
if [ "$device" = cuda ]; then
    $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
    tar xzf .gpu/fonts-printed.tgz -C /
    mkdir -p ../shared/data/train && tar xzf .gpu/lines.tgz -C ../shared/data/train
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    precisions="fp16 bf16" lines=1024 batch=256 smoke_steps=150
else
    precisions=fp32 lines=16 batch=8 smoke_steps=4
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
$python bench/gpu_pack.py restore .gpu/base out/printed-small-real5 || exit 1
$python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

config=/tmp/gpu-train.yaml
sed -e "s/^device: .*/device: $device/" configs/train-printed-small-gpu.yaml > $config
[ "$device" = cuda ] || sed -i -e 's/^precision: .*/precision: fp32/' -e 's/^loader_workers: .*/loader_workers: 1/' \
    -e 's/^batch_size: .*/batch_size: 4/' $config
if [ "$mode" = smoke ]; then
    for precision in $precisions; do
        timeout 120 $python bench/recognize.py --model random-base --device $device --precision $precision \
            --max-new-tokens 24 --lines $lines --batch-size $batch --no-naive 2>&1 | grep -v Warning
    done
    timeout 90 $python bench/recognize.py --model out/printed-small-real5 --device $device --precision ${precisions%% *} \
        --real ../shared/data/train/val --lines $((lines / 2)) --batch-size $batch --no-naive 2>&1 | grep -v Warning
    sed -i -e "s/^steps: .*/steps: $smoke_steps/" -e "s/^validate_every: .*/validate_every: $smoke_steps/" \
        -e 's|^output_dir: .*|output_dir: out/gpu-smoke|' -e 's|^work_dir: .*|work_dir: out/train-gpu-smoke|' $config
    model=out/gpu-smoke
else
    [ -n "${STEPS:-}" ] && sed -i "s/^steps: .*/steps: $STEPS/" $config
    model=models/trocr-pipeline-printed-small
fi
start=$(date +%s)
timeout "${TRAIN_SECONDS:-480}" $python -m pipeline.cli train --config $config --no-progress 2>&1 | grep -v Warning
echo "training ($mode): $(( $(date +%s) - start )) s for $(grep '^steps:' $config)"
$python bench/gpu_pack.py ship $model "$out" && ls -la "$out"
