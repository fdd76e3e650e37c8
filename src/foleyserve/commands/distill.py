"""`foleyserve distill prepare|train|eval`: make the turbo tier (docs/turbo.md).

* ``prepare INPUT --out DATA``: the teacher over a folder of videos or a CSV (video,prompt): features,
  samples and trajectory states in safetensors shards (resumable);
* ``train DATA --out RUN --target student|decoder``: a K-step guidance-free student, or the light
  decoder (resumable, EMA, JSON log);
* ``eval DATA --student FILE``: the student at K steps and the teacher at K steps with CFG, both
  against the teacher at 50 steps with CFG; JSON and a table.

Every argument and input is checked before a model loads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from foleyserve.cli import EXIT_OK, UsageError, _add_engine_args, engine_config_from_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill", help="distil the turbo tier: a few-step student denoiser and a light decoder",
        description="Make the turbo tier from the loaded model (the teacher): prepare data, train, evaluate. See docs/turbo.md.",
    )
    dsub = p.add_subparsers(dest="distill_command", metavar="STEP", required=True)

    pp = dsub.add_parser("prepare", help="run the teacher over videos once and store features, samples and trajectories")
    pp.add_argument("input", type=Path, metavar="INPUT", help="folder of videos (prompt: --prompt or VIDEO.txt) or CSV with video,prompt columns")
    pp.add_argument("--out", type=Path, required=True, help="data folder to write (re-run the same command to resume)")
    pp.add_argument("--prompt", default="", help="prompt of videos without their own (folder input)")
    pp.add_argument("--negative-prompt", default="noisy, harsh", help="negative prompt (default 'noisy, harsh')")
    pp.add_argument("--seeds-per-clip", type=int, default=8, help="teacher samples per clip (default 8)")
    pp.add_argument("--teacher-steps", type=int, default=50, help="teacher steps (default 50, the official)")
    pp.add_argument("--guidance", type=float, default=4.5, help="teacher CFG scale distilled into the student (default 4.5)")
    pp.add_argument("--student-steps", type=int, nargs="+", default=[4, 8], help="student step counts whose trajectory states to keep (default 4 8)")
    pp.add_argument("--duration", type=float, help="seconds of each video to use (default: up to 15)")
    pp.add_argument("--clips-per-shard", type=int, default=16, help="clips per safetensors shard (default 16)")
    pp.add_argument("--student-shift", type=float, default=1.0,
                    help="time shift of the student grids (default 1: uniform; 3 gives sigmas 1, 0.9, 0.75, 0.5, 0 at K=4)")
    pp.add_argument("--state-dtype", choices=("float32", "bfloat16"), default="float32", help="trajectory states' dtype on disk")
    pp.add_argument("--seed", type=int, default=0, help="first noise seed (default 0)")
    _add_engine_args(pp)
    pp.set_defaults(run=_run_prepare)

    pt = dsub.add_parser("train", help="train a K-step student or the light decoder on prepared data")
    pt.add_argument("data", type=Path, metavar="DATA", help="folder written by `distill prepare`")
    pt.add_argument("--out", type=Path, required=True, help="run folder: checkpoints, logs and the result (resumes if present)")
    pt.add_argument("--target", choices=("student", "decoder"), default="student", help="what to train (default student)")
    pt.add_argument("--steps", type=int, default=4, help="student: its step count K (default 4)")
    pt.add_argument("--iterations", type=int, default=1000, help="optimizer steps (default 1000)")
    pt.add_argument("--batch-size", type=int, default=8, help="rows per step (default 8)")
    pt.add_argument("--lr", type=float, help="learning rate (default 2e-4 student, 1e-3 decoder)")
    pt.add_argument("--ema-decay", type=float, help="EMA decay of the saved weights (default 0.99 student, 0.995 decoder)")
    pt.add_argument("--segment", type=int, default=32, help="decoder: latent frames per training window (default 32)")
    pt.add_argument("--start-fraction", type=float, default=0.5,
                    help="student: share of samples at a window start (where sampling evaluates) rather than inside it (default 0.5)")
    pt.add_argument("--first-window-share", type=float,
                    help="student: share of rows from the first window, where eval's per-step errors usually show the error is made (default: 1/K, uniform)")
    pt.add_argument("--rollout-weight", type=float, default=0.0,
                    help="student: weight of the end-to-end term, its own K-step sample vs the teacher's (default 0: off; K more passes per iteration)")
    pt.add_argument("--rollout-start", type=int, default=0, help="student: iteration from which the end-to-end term is on (default 0)")
    pt.add_argument("--adversarial-weight", type=float, default=0.0,
                    help="decoder: weight of the HiFi-GAN style adversarial + feature-matching term (default 0: off)")
    pt.add_argument("--adversarial-start", type=int, default=0, help="decoder: iteration from which the adversarial term is on (default 0)")
    pt.add_argument("--grad-checkpointing", action="store_true", help="student: recompute each block in the backward pass (less memory)")
    pt.add_argument("--no-bf16", action="store_true", help="student on CUDA: train without bf16 autocast")
    pt.add_argument("--checkpoint-every", type=int, default=500, help="iterations between checkpoints (default 500)")
    pt.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    pt.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    pt.add_argument("--seed", type=int, default=0)
    pt.set_defaults(run=_run_train)

    pe = dsub.add_parser("eval", help="student at K steps vs the teacher at 50 guided steps (and the teacher at K)")
    pe.add_argument("data", type=Path, metavar="DATA", help="folder written by `distill prepare` (its clips; fresh seeds)")
    pe.add_argument("--student", type=Path, action="append", default=[], help="student file (repeat for K=4 and K=8)")
    pe.add_argument("--light-decoder", type=Path, help="light decoder file")
    pe.add_argument("--seeds-per-clip", type=int, default=2, help="held-out seeds per clip (default 2)")
    pe.add_argument("--max-clips", type=int, help="evaluate only the first N clips")
    pe.add_argument("--train-seeds", type=int, default=0,
                    help="also run the students on N of each clip's training seeds: memorisation shows as a gap to new noise (default 0)")
    pe.add_argument("--reference-steps", type=int, default=50, help="teacher steps of the reference (default 50)")
    pe.add_argument("--scores", action="store_true", help="also CLAP text-match and DeSync (demo scorers for a demo teacher)")
    pe.add_argument("--json", type=Path, help="write the report here")
    pe.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    pe.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    pe.set_defaults(run=_run_eval)


def _progress(desc: str, unit: str):
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int, record: dict | None = None) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None)
        bar.n = done
        if record and "loss" in record:
            bar.set_postfix(loss=record["loss"], refresh=False)
        bar.refresh()
        if done >= total:
            bar.close()

    return update


def _positive(name: str, value: int | float | None) -> None:
    if value is not None and value <= 0:
        raise UsageError(f"{name} must be positive, got {value}")


def _device(text: str):
    from foleyserve.pipeline.devices import resolve_device

    try:
        dev = resolve_device(text)
    except (RuntimeError, ValueError) as e:
        raise UsageError(str(e)) from None
    return dev


def _run_prepare(args: argparse.Namespace) -> int:
    from foleyserve.distill.data import DataError, PrepareOptions, read_inputs

    for name in ("seeds_per_clip", "teacher_steps", "clips_per_shard", "duration"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    if any(k < 1 or k > args.teacher_steps for k in args.student_steps):
        raise UsageError(f"--student-steps must be between 1 and --teacher-steps ({args.teacher_steps}), got {args.student_steps}")
    if args.student_shift <= 0:
        raise UsageError(f"--student-shift must be positive, got {args.student_shift}")
    if not 0 <= args.guidance <= 100:
        raise UsageError(f"--guidance must be between 0 and 100, got {args.guidance}")
    if args.student is not None or args.light_decoder is not None:
        raise UsageError("prepare runs the teacher: drop --student/--light-decoder")
    if args.demo and args.precision is None:
        args.precision = "fp32"  # the teacher the train and eval steps rebuild is the fp32 demo model
    config = engine_config_from_args(args)
    try:
        clips = read_inputs(args.input, prompt=args.prompt, negative_prompt=args.negative_prompt)
    except DataError as e:
        raise UsageError(str(e)) from None
    teacher = {"demo": True} if config.demo else {
        "model_dir": str(config.model_dir), "model": config.model, "precision": config.precision,
        "siglip_dir": config.siglip_dir and str(config.siglip_dir), "clap_dir": config.clap_dir and str(config.clap_dir),
    }
    options = PrepareOptions(
        teacher=teacher, teacher_steps=args.teacher_steps, guidance=args.guidance, seeds_per_clip=args.seeds_per_clip,
        clips_per_shard=args.clips_per_shard, duration=args.duration, seed=args.seed, clips=clips,
        student_steps=sorted(set(args.student_steps)), student_shift=args.student_shift, state_dtype=args.state_dtype,
    )
    from foleyserve.cli import check_before_loading, load_engine
    from foleyserve.distill.data import check_out_folder, check_seed_range, prepare

    try:
        check_seed_range(options)
        check_out_folder(args.out, options)
    except DataError as e:
        raise UsageError(str(e)) from None
    check_before_loading(config, [])
    engine = load_engine(config)
    manifest = prepare(engine, args.out, options, progress=_progress("teacher", "clip"))
    print(f"wrote {args.out}: {manifest['clips']} clips x {options.seeds_per_clip} samples in {len(manifest['shards'])} shards, "
          f"{manifest['bytes'] / 2**20:.1f} MiB on disk")
    return EXIT_OK


def _teacher_for(data: Path, device):
    from foleyserve.distill.data import DataError, read_manifest
    from foleyserve.distill.turbo import teacher_components
    from foleyserve.pipeline.devices import resolve_precision

    try:
        manifest = read_manifest(data)
    except DataError as e:
        raise UsageError(str(e)) from None
    spec = manifest["options"]["teacher"]
    dtype = resolve_precision(spec.get("precision", "fp32")) if not spec.get("demo") else None
    import torch

    return manifest, teacher_components(spec, device, dtype or torch.float32)


def _run_train(args: argparse.Namespace) -> int:
    import torch

    from foleyserve.distill.data import DataError, read_manifest

    for name in ("steps", "iterations", "batch_size", "lr", "segment", "checkpoint_every", "threads"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    if not 0 <= args.start_fraction <= 1:
        raise UsageError(f"--start-fraction must be in [0, 1], got {args.start_fraction}")
    if args.first_window_share is not None and not 0 < args.first_window_share < 1:
        raise UsageError(f"--first-window-share must be between 0 and 1 (exclusive), got {args.first_window_share}")
    if args.rollout_weight < 0 or args.rollout_start < 0:
        raise UsageError(f"--rollout-weight and --rollout-start must be >= 0, got {args.rollout_weight} and {args.rollout_start}")
    if args.adversarial_weight < 0 or args.adversarial_start < 0:
        raise UsageError(f"--adversarial-weight and --adversarial-start must be >= 0, got {args.adversarial_weight} and {args.adversarial_start}")
    if args.ema_decay is not None and not 0 <= args.ema_decay < 1:
        raise UsageError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    try:
        manifest = read_manifest(args.data)
    except DataError as e:
        raise UsageError(str(e)) from None
    if args.target == "student":
        have = manifest["options"].get("student_steps", [])
        if args.steps not in have:
            raise UsageError(f"{args.data} holds trajectories for {have} steps, not {args.steps}; prepare with --student-steps {args.steps}")
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    manifest, comps = _teacher_for(args.data, device)
    if args.target == "student":
        from foleyserve.distill.train_student import StudentTrainOptions, train_student

        opts = StudentTrainOptions(
            steps=args.steps, shift=float(manifest["options"].get("student_shift", 1.0)), iterations=args.iterations, batch_size=args.batch_size, lr=args.lr or 2e-4,
            ema_decay=0.99 if args.ema_decay is None else args.ema_decay, grad_checkpointing=args.grad_checkpointing,
            start_fraction=args.start_fraction, first_window_share=args.first_window_share, rollout_weight=args.rollout_weight, rollout_start=args.rollout_start,
            bf16=not args.no_bf16, checkpoint_every=args.checkpoint_every, seed=args.seed, threads=args.threads,
        )
        out = train_student(comps.dit, args.data, args.out, opts, teacher_info=manifest["options"]["teacher"],
                            guidance=float(manifest["options"]["guidance"]), device=device,
                            progress=_progress(f"student k={args.steps}", "it"))
    else:
        from foleyserve.distill.train_decoder import DecoderTrainOptions, train_decoder

        opts_d = DecoderTrainOptions(
            iterations=args.iterations, batch_size=args.batch_size, segment=args.segment, lr=args.lr or 1e-3,
            ema_decay=0.995 if args.ema_decay is None else args.ema_decay, checkpoint_every=args.checkpoint_every,
            seed=args.seed, threads=args.threads, adversarial_weight=args.adversarial_weight,
            adversarial_start=args.adversarial_start,
        )
        out = train_decoder(comps.dac, args.data, args.out, opts_d, device=device, progress=_progress("light decoder", "it"))
    print(f"wrote {out} (log: {args.out})")
    return EXIT_OK


def _run_eval(args: argparse.Namespace) -> int:
    import torch

    from foleyserve.distill.evaluate import evaluate, table
    from foleyserve.distill.light_decoder import LightDecoderError, load_light_decoder, read_light_config
    from foleyserve.distill.student import StudentError, load_student, read_recipe

    for name in ("seeds_per_clip", "max_clips", "reference_steps", "threads"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    if args.train_seeds < 0:
        raise UsageError(f"--train-seeds must be >= 0, got {args.train_seeds}")
    if args.train_seeds and not args.student:
        raise UsageError("--train-seeds measures students: pass --student FILE")
    if not args.student and args.light_decoder is None:
        raise UsageError("nothing to evaluate: pass --student FILE (and/or --light-decoder FILE)")
    try:
        recipes = [read_recipe(p) for p in args.student]
        if args.light_decoder is not None:
            read_light_config(args.light_decoder)
    except (StudentError, LightDecoderError) as e:
        raise UsageError(str(e)) from None
    if len({r.steps for r in recipes}) != len(recipes):
        raise UsageError("two students with the same step count; pass one per K")
    if args.json is not None and args.json.is_dir():
        raise UsageError(f"--json {args.json} is a folder; give a file name")
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    manifest, comps = _teacher_for(args.data, device)
    students, shifts = {}, {}
    for path in args.student:
        dit, recipe = load_student(path, device=device, dtype=comps.dit.dtype)
        students[recipe.steps], shifts[recipe.steps] = dit, recipe.shift
    light = load_light_decoder(args.light_decoder, device=device) if args.light_decoder is not None else None
    scorers = None
    if args.scores:
        if manifest["options"]["teacher"].get("demo"):
            from foleyserve.pipeline.demo import demo_scorers

            scorers = demo_scorers(comps, device=device)
        else:
            from foleyserve.scoring import load_scorers

            scorers = load_scorers(manifest["options"]["teacher"]["model_dir"], components=comps)
    report = evaluate(comps.dit, comps.dac, args.data, students=students, student_shifts=shifts, light_decoder=light,
                      guidance=float(manifest["options"]["guidance"]), reference_steps=args.reference_steps,
                      seeds_per_clip=args.seeds_per_clip, max_clips=args.max_clips, scorers=scorers, train_seeds=args.train_seeds,
                      progress=_progress("eval", "clip"))
    if light is not None:
        from foleyserve.distill.light_decoder import decoder_params

        report["light_decoder_params"] = decoder_params(light)
        report["teacher_decoder_params"] = decoder_params(comps.dac)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    print(table(report))
    return EXIT_OK
