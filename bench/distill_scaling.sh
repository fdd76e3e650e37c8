#!/usr/bin/env bash
# The turbo student's data and iteration scaling on the demo teacher, CPU: BENCHMARKS.md "Turbo tier
# (issue 12)", "Where the error is made". About 90 min on 2 cores (two runs at a time, 1 thread each).
#   bash bench/distill_scaling.sh [WORKDIR]
set -euo pipefail
work=${1:-/tmp/turbo}
mkdir -p "$work"
video=$(python3 -c "from foleyserve.pipeline.demo import sample_clip_path; print(sample_clip_path())")
printf 'video,prompt\n%s,footsteps on gravel\n%s,rain on a tin roof\n%s,a ball bouncing on a wooden floor\n' "$video" "$video" "$video" > "$work/clips.csv"
prep() {  # seeds per clip, out folder, extra flags...
  local n=$1 out=$2; shift 2
  OMP_NUM_THREADS=1 python3 -m foleyserve distill prepare "$work/clips.csv" --out "$work/$out" --demo --duration 2 \
      --seeds-per-clip "$n" --teacher-steps 50 "$@"
}
train() {  # data, out, extra flags...
  local data=$1 out=$2; shift 2
  OMP_NUM_THREADS=1 python3 -m foleyserve distill train "$work/$data" --out "$work/$out" --steps 4 --iterations 20000 \
      --lr 1e-2 --batch-size 8 --start-fraction 1.0 --rollout-weight 30 --rollout-start 18000 --threads 1 --device cpu \
      --checkpoint-every 2000 "$@"
}
evaluate() {  # data (its own: --train-seeds reads the folder's training seeds), run, json
  OMP_NUM_THREADS=1 python3 -m foleyserve distill eval "$work/$1" --student "$work/$2/student-k4.safetensors" \
      --seeds-per-clip 4 --train-seeds 4 --threads 1 --device cpu --json "$work/$3.json"
}
prep 256 data256 --student-steps 4 8 & prep 512 data512 --student-steps 4 8 & wait
# A: 768 trajectories, B: 1536 (same recipe, 20000 iterations; the earlier run had 6000).
train data256 A256 & train data512 B512 & wait
# C: 1536 trajectories, most rows from the first window (where the per-step errors show the error is made).
# S: 1536 trajectories on a time-shifted grid (sigmas 1, 0.9, 0.75, 0.5, 0): shorter first windows.
prep 512 data512s3 --student-steps 4 --student-shift 3
train data512 C512w7 --first-window-share 0.7 & train data512s3 S512 & wait
evaluate data256 A256 eval_A256
for r in B512 C512w7; do evaluate data512 "$r" "eval_$r"; done
evaluate data512s3 S512 eval_S512
# The results file also holds evaluations of intermediate checkpoints (copies of
# RUN/student-k4.safetensors taken as training passed 6000, 10000 and 12000 iterations).
