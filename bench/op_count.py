#!/usr/bin/env python3
"""aten ops in one denoising step: one ``FoleyDiT.predict_flow`` call at batch 2 (the CFG pair).

The step is the sampler's: the step-invariant conditioning (``prepare_conditions``) is done once,
outside the counted region, and the step runs under ``torch.no_grad`` and the sampler's autocast
rule (``foleyserve.pipeline.sampler._autocast_for``: autocast to the policy's ``autocast_dtype``
when that is bf16/fp16, none for fp32). Every aten op that reaches the Python dispatch key is
counted by a ``TorchDispatchMode``; that is below autograd, autocast and the
CompositeImplicitAutograd decompositions, so ``F.linear`` shows as ``t`` + ``addmm``/``mm``, an
autocast cast as ``_to_copy``, and so on.

Classification (``op_kind``):

* ``view``: the op's schema says its return aliases an input and it is not in-place/out
  (``func._schema.returns[i].alias_info`` set, ``is_write`` false): view, t, transpose, permute,
  unsqueeze, squeeze, expand, slice, select, split, unbind, alias, as_strided, detach,
  _reshape_alias, view_as_real/complex, lift_fresh, ... Plus ``_unsafe_view`` (a view whose schema
  is not annotated) and the in-place forms of view ops (``t_``, ``unsqueeze_``, ...). No kernel.
* ``alloc``: allocation only, no kernel: ``empty``, ``empty_like``, ``empty_strided``,
  ``new_empty``, ``new_empty_strided``.
* ``compute``: everything else (matmuls, elementwise, copies/casts, fills, reductions, SDPA, ...).

``non_view`` = ``compute`` ops = total - view - alloc: the estimate of kernel launches (a fused
CPU/CUDA kernel such as SDPA counts once; an op that launches several kernels counts once too).

The count does not depend on the width, so by default the model is XXL depth (18 triple + 36
single blocks) at hidden_size 128, 2 heads; ``--full-width`` builds the real XXL (about 10 GB in
bf16, 20 GB in fp32). Shapes: a 10 s clip (audio 500, visual 80, sync 240 tokens), 77 text tokens.

    python bench/op_count.py                                   # fp32 and bf16, the repo's src/
    PYTHONPATH=/tmp/before/src python bench/op_count.py --json bench/results/op_count_before.json
    python bench/op_count.py --src /tmp/before/src             # same, explicit

Which ``foleyserve`` is measured: ``--src`` if given; else one found on an explicit PYTHONPATH;
else this checkout's ``src/``. The JSON records the package path and its git commit.

Only ``build_dit``, ``xxl_config``, ``apply_policy``, ``prepare_conditions(clip_feat=, sync_feat=,
cond=, audio_len=)`` and ``predict_flow(x, t, conditions)`` are used, so the script keeps working
while the model's internals change. Tests can import :func:`count_ops` and :func:`op_kind`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]

ALLOC_ONLY = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})
UNANNOTATED_VIEWS = frozenset({"_unsafe_view"})
DEFAULT_SECONDS = 10.0
DEFAULT_TEXT_TOKENS = 77
SMALL_WIDTH = {"hidden_size": 128, "num_heads": 2}


# ----------------------------------------------------------------------------- counting


def _returns_alias(func: Any) -> bool:
    schema = func._schema
    if schema.is_mutable:
        return False
    return any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)


def op_kind(func: Any) -> str:
    """``"view"``, ``"alloc"`` or ``"compute"`` for an aten ``OpOverload`` (rule in the module doc)."""
    name = func.overloadpacket.__name__
    if name in ALLOC_ONLY:
        return "alloc"
    if name in UNANNOTATED_VIEWS or _returns_alias(func):
        return "view"
    if name.endswith("_") and not name.endswith("__"):  # in-place form of a view op: metadata only
        functional = getattr(torch.ops.aten, name[:-1], None)
        if functional is not None:
            try:
                if _returns_alias(functional.default):
                    return "view"
            except AttributeError:
                pass
    return "compute"


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.counts[func] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run ``fn()`` once and count the aten ops it dispatches.

    Returns ``{"total", "view", "alloc", "non_view", "by_op": {name: {"count", "kind"}},
    "by_overload": {name.overload: count}}``, ``by_op`` sorted by count (largest first), keyed by
    the op name without the overload (``aten.mm``). ``non_view`` = total - view - alloc.
    """
    mode = _Counter()
    with mode:
        fn()
    by_op: dict[str, dict[str, Any]] = {}
    by_overload: dict[str, int] = {}
    totals = Counter()
    for func, n in mode.counts.items():
        kind = op_kind(func)
        totals[kind] += n
        key = str(func.overloadpacket)
        entry = by_op.setdefault(key, {"count": 0, "kind": kind})
        entry["count"] += n
        by_overload[str(func)] = by_overload.get(str(func), 0) + n
    total = sum(totals.values())
    return {
        "total": total,
        "view": totals["view"],
        "alloc": totals["alloc"],
        "non_view": totals["compute"],
        "by_op": dict(sorted(by_op.items(), key=lambda kv: (-kv[1]["count"], kv[0]))),
        "by_overload": dict(sorted(by_overload.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


# ----------------------------------------------------------------------------- which foleyserve


def select_foleyserve(src: Path | None) -> None:
    """Put the chosen ``foleyserve`` first on ``sys.path`` (see the module doc) and import it."""
    if src is not None:
        sys.path.insert(0, str(src.resolve()))
    elif os.environ.get("PYTHONPATH") and importlib.util.find_spec("foleyserve") is not None:
        pass  # an explicit PYTHONPATH (or an installed copy) provides it
    elif str(REPO / "src") not in sys.path:
        sys.path.insert(0, str(REPO / "src"))
    import foleyserve

    if src is not None and Path(foleyserve.__file__).resolve().parents[1] != src.resolve():
        raise SystemExit(f"--src {src}: foleyserve was already imported from {foleyserve.__file__}")


def _git_state(path: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", ".")),
                "worktree": git("rev-parse", "--show-toplevel")}
    except (OSError, subprocess.CalledProcessError):
        return {}


def _dit_step_helpers() -> tuple[Callable[[float], dict[str, int]], Callable[..., dict[str, torch.Tensor]] | None]:
    """``clip_lengths`` and ``make_inputs`` from bench/dit_step.py, or local copies if it will not load."""
    try:
        spec = importlib.util.spec_from_file_location("bench_dit_step", REPO / "bench" / "dit_step.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.clip_lengths, module.make_inputs
    except Exception:  # noqa: BLE001 - e.g. a helper it imports from foleyserve was renamed
        pass

    def clip_lengths(seconds: float) -> dict[str, int]:
        frames25 = int(round(seconds * 25))
        return {"audio_len": int(frames25 / 25 * 50), "visual_len": int(round(seconds * 8)),
                "sync_len": 8 * ((frames25 - 16) // 8 + 1)}

    return clip_lengths, None


def _make_inputs(config: dict[str, Any], lengths: dict[str, int], text_len: int, make: Callable[..., Any] | None) -> dict[str, torch.Tensor]:
    if make is not None:
        return make(config, lengths, text_len, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(2, int(config.get("audio_vae_latent_dim", 128)), lengths["audio_len"], generator=g),
        "clip_feat": torch.randn(2, lengths["visual_len"], int(config.get("clip_dim", 768)), generator=g),
        "sync_feat": torch.randn(2, lengths["sync_len"], int(config.get("sync_feat_dim", 768)), generator=g),
        "cond": torch.randn(2, text_len, int(config.get("condition_dim", 768)), generator=g),
        "t": torch.full((2,), 500.0),
    }


def _autocast(dit: torch.nn.Module) -> tuple[contextlib.AbstractContextManager, str]:
    try:
        from foleyserve.pipeline.sampler import _autocast_for

        return _autocast_for(dit), "foleyserve.pipeline.sampler._autocast_for"
    except ImportError:
        pass
    dtype = getattr(dit, "autocast_dtype", next(dit.parameters()).dtype)
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device_type="cpu", dtype=dtype), "local copy of the sampler's rule"
    return contextlib.nullcontext(), "local copy of the sampler's rule"


# ----------------------------------------------------------------------------- one policy


def count_step(config: dict[str, Any], precision: str, *, seconds: float, text_len: int, log: Callable[[str], None]) -> dict[str, Any]:
    from foleyserve.models.dit import build_dit
    from foleyserve.precision import apply_policy

    clip_lengths, make = _dit_step_helpers()
    lengths = clip_lengths(seconds)
    storage = {"fp32": torch.float32, "fp16": torch.float16}.get(precision, torch.bfloat16)
    start = time.perf_counter()
    dit = build_dit(config, dtype=storage, seed=0)
    apply_policy(dit, precision)
    log(f"{precision}: built and converted in {time.perf_counter() - start:.1f} s")
    inputs = _make_inputs(config, lengths, text_len, make)
    with torch.no_grad():
        ctx, rule = _autocast(dit)
        prep: dict[str, Any] = {}

        def prepare() -> None:
            prep["c"] = dit.prepare_conditions(clip_feat=inputs["clip_feat"], sync_feat=inputs["sync_feat"],
                                               cond=inputs["cond"], audio_len=lengths["audio_len"])

        with ctx:
            prepare_counts = count_ops(prepare)
        conditions = prep["c"]

        def step() -> None:
            ctx_step, _ = _autocast(dit)
            with ctx_step:
                prep["out"] = dit.predict_flow(inputs["x"], inputs["t"], conditions)

        step()  # warm-up: lazy one-time work (if any) stays out of the count
        start = time.perf_counter()
        counts = count_ops(step)
        log(f"{precision}: step counted in {time.perf_counter() - start:.1f} s: {counts['total']} aten ops, "
            f"{counts['non_view']} non-view")
        out = prep["out"]
    return {
        "precision": precision,
        **lengths,
        "text_len": text_len,
        "batch": 2,
        "autocast_dtype": str(getattr(dit, "autocast_dtype", None)),
        "autocast_rule": rule,
        "output": {"shape": list(out.shape), "dtype": str(out.dtype), "finite": bool(torch.isfinite(out).all())},
        "step": counts,
        "prepare_conditions": {k: prepare_counts[k] for k in ("total", "view", "alloc", "non_view")},
    }


def format_table(rows: list[dict[str, Any]], top: int) -> str:
    lines = ["| precision | total aten ops | view | alloc | non-view (kernel estimate) | prepare_conditions (once per request; not in the step) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        s, p = r["step"], r["prepare_conditions"]
        lines.append(f"| {r['precision']} | {s['total']} | {s['view']} | {s['alloc']} | **{s['non_view']}** | {p['total']} total, {p['non_view']} non-view |")
    names: list[str] = []
    for r in rows:
        for name in r["step"]["by_op"]:
            if name not in names:
                names.append(name)
    names.sort(key=lambda n: -max(r["step"]["by_op"].get(n, {"count": 0})["count"] for r in rows))
    lines += ["", "| op | kind | " + " | ".join(r["precision"] for r in rows) + " |", "|---|---|" + "---|" * len(rows)]
    for name in names[:top]:
        kind = next(r["step"]["by_op"][name]["kind"] for r in rows if name in r["step"]["by_op"])
        counts = " | ".join(str(r["step"]["by_op"].get(name, {"count": 0})["count"]) for r in rows)
        lines.append(f"| {name} | {kind} | {counts} |")
    return "\n".join(lines)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precisions", default="fp32,bf16", help="policies of foleyserve.precision (default fp32,bf16)")
    ap.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="clip length (default 10: 500/80/240 tokens)")
    ap.add_argument("--text-tokens", type=int, default=DEFAULT_TEXT_TOKENS, help="text tokens (default 77)")
    ap.add_argument("--full-width", action="store_true", help="the real XXL width (1536, 12 heads): slow, ~10 GB bf16 / ~20 GB fp32")
    ap.add_argument("--src", type=Path, help="the src/ folder whose foleyserve to measure (default: PYTHONPATH, else this repo's)")
    ap.add_argument("--top", type=int, default=25, help="ops in the breakdown table (default 25)")
    ap.add_argument("--threads", type=int, help="torch threads")
    ap.add_argument("--json", type=Path, help="also write the counts as JSON")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(line: str) -> None:
        print(f"op_count: {line}", file=sys.stderr, flush=True)

    select_foleyserve(args.src)
    import foleyserve
    from foleyserve.models.dit import xxl_config

    src = Path(foleyserve.__file__).resolve().parents[1]
    git = _git_state(src)
    log(f"foleyserve from {src}" + (f" (commit {git['commit'][:10]}{', dirty' if git['dirty'] else ''})" if git else ""))
    config = dict(xxl_config()) if args.full_width else {**xxl_config(), **SMALL_WIDTH}
    rows = [count_step(config, p, seconds=args.seconds, text_len=args.text_tokens, log=log) for p in _csv(args.precisions)]

    width = f"hidden {config['hidden_size']}, {config['num_heads']} heads" + ("" if args.full_width else " (op counts do not depend on width)")
    r0 = rows[0]
    print(f"# aten ops in one predict_flow step, batch 2; XXL depth ({config['depth_triple_blocks']} triple + "
          f"{config['depth_single_blocks']} single blocks), {width}")
    print(f"# {args.seconds:g} s clip: audio {r0['audio_len']}, visual {r0['visual_len']}, sync {r0['sync_len']}, text {r0['text_len']} tokens; "
          f"torch {torch.__version__}; foleyserve from {src}" + (f" @ {git['commit'][:10]}{' (dirty)' if git['dirty'] else ''}" if git else ""))
    print("# non-view = total - view - alloc (rule: bench/op_count.py docstring)")
    print()
    print(format_table(rows, args.top))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "tool": "bench/op_count.py", "argv": sys.argv[1:] if argv is None else argv, "torch": torch.__version__,
            "foleyserve": str(src), "git": git, "config": config, "full_width": args.full_width,
            "rule": "view: schema return aliases an input (alias_info, not write) and op not mutable, plus _unsafe_view and "
                    "in-place forms of view ops; alloc: empty, empty_like, empty_strided, new_empty, new_empty_strided; "
                    "non_view = total - view - alloc",
            "rows": rows,
        }, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
