#!/usr/bin/env bash
# GPU check, to run wherever a CUDA GPU is available (about 3 minutes on one H200):
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# 1. ResNet-50 at 224 px, bf16 AMP, channels_last: images/s of tllab's training step against a bare torch loop
#    on one synthetic device-resident batch (goal: ratio >= 0.95), first with in-memory inputs, then with JPEGs
#    decoded and augmented by 16 loader workers (the data pipeline must keep up);
# 2. the same with trainer.compile=true (torch.compile of the backbone);
# 3. a short tllab-train run on CUDA with the per-class metric.
# Results are appended to OUT_DIR/resnet50_step_gpu.md (default: benchmarks/).
set -u
out=${1:-benchmarks}
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TLLAB_CACHE_DIR=${TLLAB_CACHE_DIR:-/tmp/tlcache} PYTHONPATH=$PWD
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
{
  echo "## ResNet-50 training step on $(python3 -c 'import torch; print(torch.cuda.get_device_name(0))'), $(date -u +%F)"
  echo
  echo "| machine | device | batch | amp | channels_last | data | tllab | bare | ratio |"
  echo "|---|---|---|---|---|---|---|---|---|"
  for data in "--data digits" "--data files --workers 16"; do
    timeout 300 python3 benchmarks/resnet50_step.py --device cuda --batch 128 --amp --channels-last --steps 30 \
      --warmup 10 $data 2>&1 | grep '^|'
  done
} | tee -a "$out/resnet50_step_gpu.md"
timeout 300 python3 -m tllab.train dataset=digits dataset.image_size=64 backbone=resnet18 trainer.device=cuda \
  trainer.amp=true trainer.compile=true trainer.max_steps=60 trainer.eval_every=30 trainer.quiet=true \
  hydra.run.dir=/tmp/gpu_check_compile 2>&1 | tail -3
python3 -c "import json; s=json.load(open('/tmp/gpu_check_compile/summary.json')); print('compile run:', s['steps'], 'steps', s['final']['target_test/acc'], s['final']['target_test/acc_per_class_mean'])"
