"""GPU smoke test: DeepFool on WRN-28-10 in fp32 and bf16, then a short `--use-gpu` pipeline.

Written before any GPU was available to the project; run it the first time one is:

    python benchmarks/gpu_smoke.py                   # ~5 min on one GPU
    python benchmarks/gpu_smoke.py --skip-pipeline   # the DeepFool part only (~1-2 min)

What it measures, on the first CUDA device (nothing is downloaded):
1. DeepFool (puma_ray.attacks.deepfool; l2, overshoot 0.02, max_iter 50, all 10 classes,
   exact, margins of the predicted class) on WRN-28-10 (Zagoruyko and Komodakis,
   arXiv:1605.07146; random init unless --checkpoint gives a trained margin model) on the
   builtin data's test rows, at the scorer's batch size (256) and at 1024 rows:
   - rows/s, mean iterations, ms per active sample-step and that cost in passes (one fp32
     forward + input-gradient pass per sample at the same batch = 1), for fp32 and for bf16
     autocast (`autocast_dtype=torch.bfloat16`), each with `class_grads="loop"` and
     `"batched"` (one is_grads_batched backward for all classes; memory permitting);
   - bf16 against fp32 on the same rows: median relative margin difference, Spearman, and
     whether the same samples converged;
   - GPU fp32 against CPU fp32 on 32 rows: median and max relative margin difference.
   Each timing is the best of --repeats after one warm-up run, with torch.cuda.synchronize().
   PyTorch's defaults are kept (cuDNN convolutions may use TF32 in "fp32"; the flags are
   recorded).
2. `puma-ray run --smoke-test --use-gpu` in a subprocess, in a temporary run directory: exit
   status, wall time and the last lines of its output (GPU scoring actors and Ray Train
   workers on the embedded demo, one epoch).

Prints a summary and writes bench_out/gpu_smoke.json. Exits with status 2 and a one-line
message when no CUDA device exists. `--device cpu --arch small_cnn --batches 8 --repeats 1
--skip-pipeline` runs the same code on CPU in seconds (a check of the script, not a benchmark).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from puma_ray.attacks import deepfool
from puma_ray.config import BuiltinSource
from puma_ray.data.builtin import generate
from puma_ray.models import create_model, load_checkpoint

# predicted labels: every row is attacked, also with a random-init model
SETTINGS = {"norm": "l2", "overshoot": 0.02, "max_iter": 50, "target": "predicted"}


def builtin_rows(rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    src = BuiltinSource(real_train=rows, real_test=rows, seed=seed)
    images, labels = generate(src, "test", np.arange(rows))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255).contiguous()
    return x, torch.from_numpy(labels).long()


def synced(fn):
    """fn() and its wall time, with the device drained before and after."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def t_pass(model, x, repeats: int) -> float:
    """Seconds per sample of one fp32 forward + input-gradient pass at this batch size."""

    def one():
        xg = x.detach().requires_grad_(True)
        return torch.autograd.grad(model(xg).sum(), xg)

    synced(one)
    return min(synced(one)[1] for _ in range(repeats)) / len(x)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = (t.double().argsort().argsort().double() for t in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    keep = b > 0
    return (a[keep] - b[keep]).abs() / b[keep]


def bench_deepfool(model, x, y, repeats: int, log) -> dict:
    n = len(x)
    out = {"rows": n, "t_pass_fp32_ms": 1e3 * t_pass(model, x, repeats), "runs": {}}
    results = {}
    for dtype_name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        for grads in ("loop", "batched"):
            name = f"{dtype_name}, class_grads={grads}"

            def run(dtype=dtype, grads=grads):
                return deepfool(model, x, y, autocast_dtype=dtype, class_grads=grads, **SETTINGS)

            try:
                res, _ = synced(run)  # warm-up (cuDNN algorithm choice, allocator)
                seconds = min(synced(run)[1] for _ in range(repeats))
            except torch.cuda.OutOfMemoryError as err:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                out["runs"][name] = {"error": f"out of memory: {str(err).splitlines()[0]}"}
                log(f"  {n} rows, {name}: out of memory")
                continue
            steps = int(res.iters.sum())
            ms_step = 1e3 * seconds / max(steps, 1)
            out["runs"][name] = {
                "rows_per_s": n / seconds,
                "mean_iters": float(res.iters.float().mean()),
                "converged": float(res.converged.float().mean()),
                "ms_per_sample_step": ms_step,
                "passes_per_sample_step": ms_step / out["t_pass_fp32_ms"],
                "peak_memory_gib": _peak_memory_gib(x.device),
            }
            results[name] = res
            r = out["runs"][name]
            log(f"  {n} rows, {name}: {r['rows_per_s']:.0f} rows/s, mean iters "
                f"{r['mean_iters']:.2f}, {r['passes_per_sample_step']:.2f} passes/step")
    fp32, bf16 = results.get("fp32, class_grads=loop"), results.get("bf16, class_grads=loop")
    if fp32 is not None and bf16 is not None:
        rel = rel_diff(bf16.margin, fp32.margin)
        out["bf16_vs_fp32"] = {
            "median_rel_diff": float(rel.median()),
            "p95_rel_diff": float(rel.quantile(0.95)),
            "spearman": spearman(bf16.margin.cpu(), fp32.margin.cpu()),
            "same_converged": bool(torch.equal(bf16.converged, fp32.converged)),
        }
    batched = results.get("fp32, class_grads=batched")
    if fp32 is not None and batched is not None:
        out["batched_vs_loop_max_rel_diff"] = float(rel_diff(batched.margin, fp32.margin).max())
    return out


def _peak_memory_gib(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def gpu_vs_cpu(model, x, y) -> dict:
    gpu = deepfool(model, x.cuda(), y.cuda(), **SETTINGS)
    cpu_model = model.cpu()
    try:
        cpu = deepfool(cpu_model, x, y, **SETTINGS)
    finally:
        model.cuda()
    rel = rel_diff(gpu.margin.cpu(), cpu.margin)
    return {"rows": len(x), "median_rel_diff": float(rel.median()),
            "max_rel_diff": float(rel.max()),
            "same_iters": bool(torch.equal(gpu.iters.cpu(), cpu.iters))}


def pipeline_smoke(timeout: int, log) -> dict:
    with tempfile.TemporaryDirectory(prefix="puma_gpu_smoke_") as run_dir:
        # --smoke-test writes to <run dir>-smoke: a folder inside the temporary one
        cmd = [sys.executable, "-m", "puma_ray", "run", "--smoke-test", "--use-gpu",
               "--run-dir", os.path.join(run_dir, "run")]
        log("pipeline: " + " ".join(cmd))
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            status, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as err:
            status = f"timed out after {timeout} s"
            output = _text(err.stdout) + _text(err.stderr)
        seconds = time.perf_counter() - start
    tail = output.strip().splitlines()[-25:]
    log(f"pipeline: exit status {status} after {seconds:.0f} s")
    return {"command": "puma-ray " + " ".join(cmd[3:]), "exit_status": status,
            "seconds": seconds, "output_tail": tail}


def _text(captured) -> str:
    """A TimeoutExpired's captured output: bytes (whatever text=) or None."""
    if captured is None:
        return ""
    return captured.decode(errors="replace") if isinstance(captured, bytes) else captured


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="a margin-model checkpoint (default: random --arch)")
    ap.add_argument("--arch", default="wrn28_10", help="registered model name (random init)")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu to check the script itself")
    ap.add_argument("--batches", type=int, nargs="+", default=[256, 1024],
                    help="rows per deepfool call to time")
    ap.add_argument("--repeats", type=int, default=2, help="best of this many timed runs")
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--pipeline-timeout", type=int, default=480, help="seconds")
    ap.add_argument("--out-dir", default="bench_out")
    args = ap.parse_args()
    if args.device != "cpu" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device (torch.cuda.is_available() is False); nothing measured",
              file=sys.stderr)
        return 2
    started = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - started:6.0f} s] {msg}", flush=True)

    on_gpu = args.device != "cpu"
    device = torch.cuda.get_device_name(0) if on_gpu else platform.processor() or "cpu"
    log(f"device: {device}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    if args.checkpoint:
        model, _ = load_checkpoint(args.checkpoint, map_location=args.device)
        arch = args.checkpoint
    else:
        torch.manual_seed(0)
        model = create_model(args.arch, num_classes=10).to(args.device)
        arch = f"{args.arch} (random init)"
    model.eval()
    x_all, y_all = builtin_rows(max(args.batches))
    results = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "device": device,
                    "torch": torch.__version__, "cuda": torch.version.cuda,
                    "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                    "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32},
        "model": arch, "deepfool": SETTINGS, "batches": {},
    }
    for rows in args.batches:
        x, y = x_all[:rows].to(args.device), y_all[:rows].to(args.device)
        results["batches"][str(rows)] = bench_deepfool(model, x, y, args.repeats, log)
    if on_gpu:
        results["gpu_vs_cpu"] = gpu_vs_cpu(model, x_all[:32], y_all[:32])
        log(f"GPU vs CPU fp32 margins: {results['gpu_vs_cpu']}")
        del model
        torch.cuda.empty_cache()
    if on_gpu and not args.skip_pipeline:
        results["pipeline"] = pipeline_smoke(args.pipeline_timeout, log)
    results["total_s"] = time.perf_counter() - started

    print("\n| rows | run | rows/s | mean iters | ms/sample-step | passes/step | peak GiB |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for rows, res in results["batches"].items():
        for name, r in res["runs"].items():
            if "error" in r:
                print(f"| {rows} | {name} | {r['error']} | | | | |")
                continue
            print(f"| {rows} | {name} | {r['rows_per_s']:.0f} | {r['mean_iters']:.2f} "
                  f"| {r['ms_per_sample_step']:.3f} | {r['passes_per_sample_step']:.2f} "
                  f"| {r['peak_memory_gib']:.1f} |")
        if "bf16_vs_fp32" in res:
            print(f"bf16 vs fp32 at {rows} rows: {res['bf16_vs_fp32']}")
    if "pipeline" in results:
        p = results["pipeline"]
        print(f"\npipeline ({p['command']}): exit status {p['exit_status']}, {p['seconds']:.0f} s")
        print("\n".join("  " + line for line in p["output_tail"]))
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "gpu_smoke.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"\nwrote {path}")
    ok = results.get("pipeline", {}).get("exit_status", 0) == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
