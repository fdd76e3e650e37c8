#!/usr/bin/env python3
"""Peak host memory (RSS) and wall time of loading a DiT checkpoint, per loading strategy.

Writes a random denoiser checkpoint once (``--size xl``: 2,912,962,688 bf16 parameters, the
layout of the official ``hunyuanvideo_foley_xl.pth``; ``--size tiny`` for a quick smoke run),
converts it to safetensors with ``foleyserve.models.loading.convert_to_safetensors``, then loads
it with each strategy in a fresh subprocess, so that every peak (``ru_maxrss``) is clean:

  a  official: model built with real bf16 storage, ``torch.load(weights_only=False)`` without
     mmap, ``load_state_dict(strict=False)`` (what the official loader does)
  b  ours .pth: meta-built model, ``read_checkpoint`` (mmap) + ``load_into(dtype=bf16)``
  c  ours .safetensors: same with the converted file
  d  ours .safetensors -> fp32: ``load_into(dtype=float32)`` (cast on load)

After loading, every parameter is read (an int64 checksum of its bf16 bit patterns), so lazily
mapped pages really are paged in; checksums are compared with the ones recorded when the file
was written, and two tensors are compared element-wise with a fresh read of the file.

RSS on Linux counts anonymous memory *and* the file-backed pages a process has mapped and
touched. The child samples ``/proc/self/status`` (RssAnon, RssFile) to tell them apart: a
parameter that aliases the mmap'd checkpoint shows up as RssFile (clean page cache the kernel
can drop and re-read), a copy shows up as RssAnon.

The orchestrating process never imports torch and stays small: a child's ``ru_maxrss`` starts
from the RSS of the process it was forked from.

    python bench/load_rss.py                       # XL, 1 run per strategy
    python bench/load_rss.py --repeats 3 --json out.json
    python bench/load_rss.py --size tiny --keep --dir /tmp/lr
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GIB = 1 << 30
STRATEGIES = {
    "a": "official: bf16 model + torch.load (no mmap) + load_state_dict(strict=False)",
    "b": "ours .pth: meta model + read_checkpoint (mmap) + load_into(dtype=bf16)",
    "c": "ours .safetensors: meta model + read_checkpoint + load_into(dtype=bf16)",
    "d": "ours .safetensors -> fp32: meta model + read_checkpoint + load_into(dtype=fp32)",
}
FILE_OF = {"a": "pth", "b": "pth", "c": "safetensors", "d": "safetensors"}
# Rough peak RSS needed, in multiples of the checkpoint size, for the free-memory guard.
NEED = {"a": 2.2, "b": 1.2, "c": 1.2, "d": 3.2}


# ---------------------------------------------------------------------------------------------
# helpers shared by parent and children (stdlib only)


def proc_status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, RssShmem, VmHWM of this process, in bytes."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def model_config(size: str) -> dict:
    from foleyserve.models.dit import tiny_config, xl_config

    return {"xl": xl_config, "tiny": tiny_config}[size]()


def bits_checksum(t) -> int:
    """Sum of the bf16 bit patterns (as int16) of a tensor: exact, order-independent, and the same
    for a bf16 tensor and its exact fp32 cast. Reads every element."""
    import torch

    return int(t.detach().to(torch.bfloat16).view(torch.int16).sum(dtype=torch.int64))


class RssSampler(threading.Thread):
    """Polls /proc/self/status to record the peaks of RssAnon and RssFile separately
    (ru_maxrss only gives the peak of their sum). Sampled, so short spikes can be missed."""

    def __init__(self, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while not self._stop_evt.is_set():
            self.sample()
            time.sleep(self.interval)

    def sample(self) -> None:
        s = proc_status()
        for k in self.peak:
            self.peak[k] = max(self.peak[k], s.get(k, 0))

    def stop(self) -> None:
        self._stop_evt.set()
        self.join()
        self.sample()


# ---------------------------------------------------------------------------------------------
# child: write the checkpoint


def child_write(args: argparse.Namespace) -> None:
    import torch

    from foleyserve.models.dit import build_dit
    from foleyserve.models.loading import convert_to_safetensors, peak_rss_bytes

    d = Path(args.dir)
    pth, st = d / "dit.pth", d / "dit.safetensors"
    model = build_dit(model_config(args.size), dtype=torch.bfloat16, device="meta")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    del model
    t0 = time.perf_counter()
    sd: dict[str, torch.Tensor] = {}
    sums: dict[str, int] = {}
    for i, (key, shape) in enumerate(shapes.items()):
        gen = torch.Generator().manual_seed(args.seed * 100_003 + i)
        t = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
        sd[key] = t
        sums[key] = bits_checksum(t)
    t_gen = time.perf_counter() - t0
    torch.save(sd, pth)
    t_save = time.perf_counter() - t0 - t_gen
    params = sum(t.numel() for t in sd.values())
    del sd
    peak_write = peak_rss_bytes()
    t1 = time.perf_counter()
    summary = convert_to_safetensors(pth, st)
    t_conv = time.perf_counter() - t1
    info = {
        "size": args.size,
        "seed": args.seed,
        "params": params,
        "tensors": len(shapes),
        "pth_bytes": pth.stat().st_size,
        "safetensors_bytes": st.stat().st_size,
        "checksums": sums,
        "gen_s": t_gen,
        "save_s": t_save,
        "convert_s": t_conv,
        "writer_peak_rss": peak_write,
        "converter_peak_rss": peak_rss_bytes(),
        "convert_summary": {"tensors": summary.tensors, "bytes_written": summary.bytes_written},
    }
    (d / "info.json").write_text(json.dumps(info))
    print(
        f"wrote {pth} ({info['pth_bytes'] / GIB:.2f} GiB, {params:,} params, {len(shapes)} tensors) "
        f"in gen {t_gen:.1f}s + save {t_save:.1f}s, peak RSS {peak_write / GIB:.2f} GiB; "
        f"converted to {st} ({info['safetensors_bytes'] / GIB:.2f} GiB) in {t_conv:.1f}s"
    )


# ---------------------------------------------------------------------------------------------
# child: one load measurement


def _load_official(size: str, path: Path):
    import torch

    from foleyserve.models.dit import build_dit

    t0 = time.perf_counter()
    # Real allocation (and a random init that touches every page), like constructing the model.
    model = build_dit(model_config(size), dtype=torch.bfloat16, device="cpu", seed=None)
    t1 = time.perf_counter()
    state_dict = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state_dict, strict=False)
    del state_dict  # the official loader returns and drops it
    return model, t1 - t0, None


def _load_ours(size: str, path: Path, dtype):
    import torch

    from foleyserve.models.dit import build_dit
    from foleyserve.models.loading import load_into, read_checkpoint

    t0 = time.perf_counter()
    model = build_dit(model_config(size), dtype=torch.bfloat16, device="meta")
    t1 = time.perf_counter()
    sd, _ = read_checkpoint(path)
    src_ptrs = {k: v.data_ptr() for k, v in sd.items()}
    report = load_into(model, sd, strict=True, dtype=dtype)
    assert report.ok, report.describe()
    del sd
    return model, t1 - t0, src_ptrs


def child_measure(args: argparse.Namespace) -> None:
    import resource

    start_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sampler = RssSampler()
    sampler.start()
    import torch

    from foleyserve.models.loading import peak_rss_bytes

    d = Path(args.dir)
    info = json.loads((d / "info.json").read_text())
    s = args.strategy
    path = d / f"dit.{FILE_OF[s]}"
    base = proc_status()
    base_peak = peak_rss_bytes()

    t0 = time.perf_counter()
    if s == "a":
        model, build_s, src_ptrs = _load_official(args.size, path)
    else:
        model, build_s, src_ptrs = _load_ours(args.size, path, torch.float32 if s == "d" else torch.bfloat16)
    load_s = time.perf_counter() - t0 - build_s
    after_load = proc_status()
    peak_after_load = peak_rss_bytes()

    # Touch every parameter: exact checksum of its bf16 bit patterns.
    t1 = time.perf_counter()
    got = {k: bits_checksum(p) for k, p in model.state_dict().items()}
    touch_s = time.perf_counter() - t1
    end = proc_status()
    peak_end = peak_rss_bytes()
    sampler.stop()

    # Checks (after the measurements, so they do not contribute to them).
    want_dtype = torch.float32 if s == "d" else torch.bfloat16
    params = dict(model.named_parameters())
    bad_dtype = [k for k, p in params.items() if p.dtype != want_dtype or p.device.type != "cpu"]
    mismatched = [k for k, v in info["checksums"].items() if got.get(k) != v]
    missing = sorted(set(info["checksums"]) ^ set(got))
    aliased = None
    if src_ptrs is not None:
        aliased = sum(1 for k, p in params.items() if src_ptrs.get(k) == p.data_ptr())
    keys = list(info["checksums"])
    probe = [keys[0], max(keys, key=lambda k: params[k].numel())]
    if FILE_OF[s] == "safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            ref = {k: f.get_tensor(k) for k in probe}
    else:
        ref_all = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        ref = {k: ref_all[k] for k in probe}
        del ref_all
    equal = {k: bool(torch.equal(params[k].detach().to(ref[k].dtype), ref[k])) for k in probe}
    ok = not (bad_dtype or mismatched or missing) and all(equal.values())

    file_bytes = path.stat().st_size
    res = {
        "strategy": s,
        "file": path.name,
        "file_bytes": file_bytes,
        "params": sum(p.numel() for p in params.values()),
        "param_bytes": sum(p.numel() * p.element_size() for p in params.values()),
        "start_peak_rss": start_peak,
        "base_rss": base["VmRSS"],
        "base_peak_rss": base_peak,
        "build_s": build_s,
        "load_s": load_s,
        "touch_s": touch_s,
        "rss_after_load": after_load["VmRSS"],
        "anon_after_load": after_load["RssAnon"],
        "file_after_load": after_load["RssFile"],
        "peak_after_load": peak_after_load,
        "rss_end": end["VmRSS"],
        "anon_end": end["RssAnon"],
        "file_end": end["RssFile"],
        "peak_rss": peak_end,
        "peak_anon_sampled": sampler.peak["RssAnon"],
        "peak_file_sampled": sampler.peak["RssFile"],
        "aliased_params": aliased,
        "n_params": len(params),
        "checksums_ok": not (mismatched or missing),
        "dtype_device_ok": not bad_dtype,
        "probe_equal": equal,
        "ok": ok,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print("RESULT " + json.dumps(res), flush=True)
    if not ok:
        print(f"verification failed: dtype/device {bad_dtype[:3]}, checksums {mismatched[:3]}, "
              f"missing {missing[:3]}, probes {equal}", file=sys.stderr)
        sys.exit(3)


# ---------------------------------------------------------------------------------------------
# parent


def drop_file_cache(path: Path) -> None:
    """Evict this one file's clean pages from the page cache (affects no other file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_child(argv: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, os.path.abspath(__file__), *argv]
    return subprocess.run(cmd, capture_output=True, text=True)


def wait_for_memory(need: int, max_wait: float) -> bool:
    t_end = time.monotonic() + max_wait
    while mem_available() < need:
        if time.monotonic() > t_end:
            return False
        time.sleep(5)
    return True


def g(b: float) -> str:
    return f"{b / GIB:.2f}"


def summarize(results: dict[str, list[dict]], info: dict) -> str:
    ck = info["pth_bytes"]
    lines = [
        f"checkpoint: {info['params']:,} params, .pth {info['pth_bytes']:,} B ({g(info['pth_bytes'])} GiB), "
        f".safetensors {info['safetensors_bytes']:,} B ({g(info['safetensors_bytes'])} GiB)",
        "",
        "| strategy | runs | build s | load s | touch s | RSS after load GiB (anon + file) "
        "| RSS end GiB (anon + file) | peak RSS GiB | peak / file | (peak - baseline) / file "
        "| peak anon GiB* | peak file GiB* | params aliasing the file | verified |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s, runs in results.items():
        if not runs:
            lines.append(f"| {s} | 0 | | | | | | | | | | | | skipped |")
            continue

        def med(key: str) -> float:
            return statistics.median(r[key] for r in runs)

        alias = runs[0]["aliased_params"]
        alias_txt = "n/a (copied)" if alias is None else f"{alias}/{runs[0]['n_params']}"
        lines.append(
            f"| {s}: {STRATEGIES[s]} | {len(runs)} | {med('build_s'):.1f} | {med('load_s'):.1f} | "
            f"{med('touch_s'):.1f} | {g(med('rss_after_load'))} ({g(med('anon_after_load'))} + "
            f"{g(med('file_after_load'))}) | {g(med('rss_end'))} ({g(med('anon_end'))} + {g(med('file_end'))}) | "
            f"{g(med('peak_rss'))} | {med('peak_rss') / runs[0]['file_bytes']:.2f} | "
            f"{statistics.median(r['peak_rss'] - r['base_rss'] for r in runs) / runs[0]['file_bytes']:.2f} | "
            f"{g(med('peak_anon_sampled'))} | {g(med('peak_file_sampled'))} | {alias_txt} | "
            f"{'yes' if all(r['ok'] for r in runs) else 'NO'} |"
        )
    lines.append("")
    lines.append(f"(*) sampled every 10 ms from /proc/self/status; peak / file uses the file loaded "
                 f"(checkpoint {g(ck)} GiB); baseline = RSS after importing torch and foleyserve "
                 f"({g(statistics.median(r['base_rss'] for rs in results.values() for r in rs) if any(results.values()) else 0)} GiB). "
                 f"Values are medians over the runs.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=["xl", "tiny"], default="xl")
    ap.add_argument("--dir", help="where to write the checkpoints (default: a new temp dir under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint files")
    ap.add_argument("--reuse", action="store_true", help="reuse checkpoints already in --dir")
    ap.add_argument("--repeats", type=int, default=1, help="runs per strategy (interleaved); medians reported")
    ap.add_argument("--strategies", default="abcd", help="subset of abcd to run")
    ap.add_argument("--cache", choices=["cold", "warm"], default="cold",
                    help="cold: evict the checkpoint's pages from the page cache before each run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write all runs to this JSON file")
    ap.add_argument("--max-wait", type=float, default=600,
                    help="seconds to wait for enough free memory before skipping a run")
    ap.add_argument("--child", choices=["write", *STRATEGIES], help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child == "write":
        return child_write(args)
    if args.child:
        args.strategy = args.child
        return child_measure(args)

    if args.reuse and not args.dir:
        ap.error("--reuse needs --dir")
    made_dir = not args.dir
    d = Path(args.dir or tempfile.mkdtemp(prefix="foleyserve-load-rss-", dir="/tmp"))
    d.mkdir(parents=True, exist_ok=True)
    keep = args.keep or (args.dir is not None and args.reuse)
    try:
        common = ["--size", args.size, "--dir", str(d), "--seed", str(args.seed)]
        if not (args.reuse and (d / "info.json").exists()):
            free = shutil.disk_usage(d).free
            need_disk = {"xl": 13 * GIB, "tiny": 64 << 20}[args.size]
            if free < need_disk:
                sys.exit(f"{d}: {free / GIB:.1f} GiB free, need about {need_disk / GIB:.1f} GiB")
            print(f"writing the {args.size} checkpoint to {d} ...", flush=True)
            cp = run_child(["--child", "write", *common])
            sys.stdout.write(cp.stdout)
            if cp.returncode:
                sys.stderr.write(cp.stderr)
                sys.exit(f"writing the checkpoint failed (exit {cp.returncode})")
        info = json.loads((d / "info.json").read_text())
        results: dict[str, list[dict]] = {s: [] for s in args.strategies}
        for rep in range(args.repeats):
            for s in args.strategies:
                path = d / f"dit.{FILE_OF[s]}"
                need = int(NEED[s] * path.stat().st_size) + (1 << 30)
                if not wait_for_memory(need, args.max_wait):
                    print(f"[{s} run {rep + 1}] skipped: MemAvailable {g(mem_available())} GiB < "
                          f"{g(need)} GiB needed", flush=True)
                    continue
                if args.cache == "cold":
                    drop_file_cache(path)
                cp = run_child(["--child", s, *common])
                res = None
                for line in cp.stdout.splitlines():
                    if line.startswith("RESULT "):
                        res = json.loads(line[len("RESULT "):])
                if cp.returncode or res is None:
                    sys.stderr.write(cp.stdout + cp.stderr)
                    sys.exit(f"[{s} run {rep + 1}] failed (exit {cp.returncode})")
                res["run"] = rep + 1
                res["cache"] = args.cache
                results[s].append(res)
                print(
                    f"[{s} run {rep + 1}] build {res['build_s']:.1f}s load {res['load_s']:.1f}s "
                    f"touch {res['touch_s']:.1f}s | RSS after load {g(res['rss_after_load'])} GiB "
                    f"(anon {g(res['anon_after_load'])} file {g(res['file_after_load'])}), end "
                    f"{g(res['rss_end'])} GiB (anon {g(res['anon_end'])} file {g(res['file_end'])}), "
                    f"peak {g(res['peak_rss'])} GiB = {res['peak_rss'] / res['file_bytes']:.2f}x file "
                    f"(sampled peaks anon {g(res['peak_anon_sampled'])} file {g(res['peak_file_sampled'])}); "
                    f"baseline {g(res['base_rss'])} GiB (ru_maxrss at start {g(res['start_peak_rss'])}); aliased {res['aliased_params']}; "
                    f"verified {res['ok']}",
                    flush=True,
                )
        print()
        print(summarize(results, info))
        if args.json:
            info_out = {k: v for k, v in info.items() if k != "checksums"}
            Path(args.json).write_text(json.dumps({"checkpoint": info_out, "runs": results,
                                                   "cache": args.cache}, indent=1))
    finally:
        if not keep:
            for name in ("dit.pth", "dit.safetensors", "info.json"):
                (d / name).unlink(missing_ok=True)
            if made_dir:
                shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
