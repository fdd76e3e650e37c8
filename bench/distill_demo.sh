#!/usr/bin/env bash
# The turbo tier on the demo teacher, CPU: the numbers of BENCHMARKS.md "Turbo tier (issue 12)".
#   bash bench/distill_demo.sh [WORKDIR]        (about 60 min on 2 busy cores)
set -euo pipefail
work=${1:-/tmp/turbo}
mkdir -p "$work"
video=$(python3 -c "from foleyserve.pipeline.demo import sample_clip_path; print(sample_clip_path())")
printf 'video,prompt\n%s,footsteps on gravel\n%s,rain on a tin roof\n%s,a ball bouncing on a wooden floor\n' "$video" "$video" "$video" > "$work/clips.csv"
# 3 clips (2 s of the sample clip, 3 prompts) x 256 seeds, teacher 50 steps CFG 4.5, states for K = 4 and 8
# (the students: with 16 seeds per clip they memorise their training noise; see BENCHMARKS.md).
python3 -m foleyserve distill prepare "$work/clips.csv" --out "$work/data256" --demo --duration 2 --seeds-per-clip 256 \
    --teacher-steps 50 --student-steps 4 8
# 3 clips x 16 seeds: the light decoder's training latents.
python3 -m foleyserve distill prepare "$work/clips.csv" --out "$work/data" --demo --duration 2 --seeds-per-clip 16 \
    --teacher-steps 50 --student-steps 4 8
# PeRFlow for 5000 iterations, then 1000 with the end-to-end term (lr 1e-2 suits the 64-wide demo DiT only).
for k in 4 8; do
  python3 -m foleyserve distill train "$work/data256" --out "$work/f$k" --steps $k --iterations 6000 --lr 1e-2 --batch-size 8 \
      --start-fraction 1.0 --rollout-weight 30 --rollout-start 5000 --threads 1 --device cpu --checkpoint-every 1000
done
python3 -m foleyserve distill train "$work/data" --out "$work/rund" --target decoder --iterations 600 --batch-size 8 \
    --threads 1 --device cpu --checkpoint-every 200
# Held-out seeds (the eval's seeds start at 2**31; prepare's at 0).
python3 -m foleyserve distill eval "$work/data" --student "$work/f4/student-k4.safetensors" \
    --student "$work/f8/student-k8.safetensors" --light-decoder "$work/rund/light-decoder.safetensors" --seeds-per-clip 4 --scores --threads 1 --device cpu \
    --json bench/results/distill_eval_demo_cpu.json
python3 bench/distill_decoder_speed.py --seconds 10 --repeats 3 --threads 1 --json bench/results/distill_decoder_speed_cpu.json
python3 bench/distill_turbo_e2e.py --student "$work/f4/student-k4.safetensors" \
    --light-decoder "$work/rund/light-decoder.safetensors" --threads 1 --repeats 3 --json bench/results/distill_turbo_e2e_cpu.json
