#!/usr/bin/env bash
# GPU check: every training command (pretrain, sft, reward, dpo, kto, distill, ppo, grpo) for a few steps on a
# real-shaped random model (qwen2.5-0.5b; GPU_CHECK_SHAPE=llama-3.2-1b for the other) in bf16 autocast: each on
# one GPU, SFT with gradient checkpointing, DDP and FSDP over all visible GPUs with torchrun, and GRPO with
# --rollout-engine vllm when vllm is installed. Prints pass/fail, tokens/s, MFU against the GPU's dense bf16 peak
# and peak GPU memory per run, and exits 1 if any run failed. Designed to finish in under 8 minutes on one H100
# (how that was estimated: alignkit/bench/gpu_check.py's docstring).
#
#   scripts/gpu_check.sh [OUTPUT_DIR]        (default runs/gpu-check; PYTHON=/path/to/python to choose one)
#
# On a machine without CUDA it says so and exits 0.
set -u
PY="${PYTHON:-python}"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False on this machine); nothing to check."
  exit 0
fi
exec "$PY" -m alignkit.bench.gpu_check "$@"
