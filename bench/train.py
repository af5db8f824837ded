"""Benchmark XCryoNet training and inference speed.

    python bench/train.py                    # 128 px and 640 px, default settings
    python bench/train.py --quick            # fewer timed batches
    python bench/train.py --px 128 --amp bf16 --stem-stride 4 --threads 2 --compile
    python bench/train.py --px 128 --sweep   # default vs. each speed knob, one at a time

For each input size a fresh subprocess (so the peak RSS is per size) builds the ``xcryonet``
variant and a synthetic training set of the protocol's largest SS setting (100 labelled +
1500 unlabelled squares: random float16 inputs, random labels, NaN labels on the unlabelled
rows, so the masked losses behave as in a real run). It times each training phase with the real
``xcryonet.train.run_phase`` (batch gather, augmentation, forward, backward, Adam step) over a
fixed number of batches after one warm-up batch, and inference with ``predict_tensor``.

An epoch's phases see what ``xcryonet.train.train`` gives them (``xcryonet.train.phase_size``):
the primary/attribute phase every square once, each batch drawing the labelled squares'
natural share (``train.labelled_fraction`` is a least share), 1600 squares; the attribute
autoencoder phase all 1600 squares; the fusion phase the 100 labelled squares
``xcryonet.train.fusion_pass_count`` times. img/s counts the squares a phase actually
processed, and one epoch is ``sum(phase_size / img_s)``; the projected run is 75 such epochs
(checkpointing, data loading and the final evaluation excluded). At 640 px on a CPU only a
few batches are timed, and the per-image rate is extrapolated to the epoch; the output says so.

Knobs: ``--stem-stride``, ``--branch-stem-stride`` (the attribute branches'; 0 = the same as the
primary's, as before December 2026), ``--amp bf16`` (autocast; the CPU has AVX512-BF16),
``--threads``, ``--compile`` (``nn.Module.compile``; the compile time is reported apart),
``--channels-last`` (weights and inputs in channels_last). A knob that crashes is reported, not
fatal. Device ``auto`` uses CUDA when available, so the same script measures a GPU.

The allocator settings MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ (4 GiB) are set for every
process (the script re-executes itself with them when they are missing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import MALLOC_ENV, ensure_malloc_env, rss_gb  # noqa: E402  (bench/ sibling)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PHASES = ("primary_attribute", "attribute_autoencoder", "fusion")
# The protocol's largest SS setting and the full run the speed target is about.
LABELED, UNLABELED, EPOCHS = 100, 1500, 75
TARGET_MIN, TARGET_PX = 20.0, 128


# ---------------------------------------------------------------------------------------------
# Worker: one input size, one set of knobs, in its own process


def _synthetic_set(n: int, px: int, n_labeled: int, seed: int):  # type: ignore[no-untyped-def]
    """A SquareSet of n random squares; the first n_labeled rows get labels, the rest NaN."""
    import torch

    from xcryonet.train import SquareSet

    gen = torch.Generator().manual_seed(seed)
    x = torch.empty((n, 1, px, px), dtype=torch.float16)
    for start in range(0, n, 64):  # in chunks: a float32 copy of 1600 x 640^2 is 2.6 GB
        stop = min(start + 64, n)
        x[start:stop] = torch.randn((stop - start, 1, px, px), generator=gen).half()
    y = torch.randint(0, 5, (n, 5), generator=gen).float()
    y[n_labeled:] = float("nan")
    perm = torch.randperm(n, generator=gen)  # labelled rows spread over the batches
    return SquareSet(x[perm], y[perm], [str(i) for i in range(n)])


def _sync(device) -> None:  # type: ignore[no-untyped-def]
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(args: argparse.Namespace) -> dict:
    """Time every phase and inference at ``args.px[0]``; returns the figures as a dict."""
    import numpy as np
    import torch

    from xcryonet.config import ModelConfig, TrainConfig
    from xcryonet.model import build_model
    from xcryonet.train import (
        autocast,
        fusion_pass_count,
        make_optimizers,
        phase_generator,
        phase_size,
        phases_for,
        predict_tensor,
        resolve_device,
        run_phase,
        set_trainable,
    )

    px = args.px[0]
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = TrainConfig(batch_size=args.batch_size, amp=args.amp, device=args.device, progress=False)
    mcfg = ModelConfig(
        input_px=px,
        stem_stride=args.stem_stride,
        branch_stem_stride=args.branch_stem_stride,
        width=args.width,
    )
    torch.manual_seed(0)
    model = build_model("xcryonet", mcfg).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    phases = phases_for("xcryonet", cfg.lr, fusion_pass_count(cfg, LABELED))
    opts = make_optimizers(model, phases)
    if args.compile:
        model.compile()

    # The whole SS training set stays in memory, as in a real run (it counts in the RSS).
    n_rows = LABELED + UNLABELED
    data = _synthetic_set(n_rows, px, LABELED, seed=1)
    batches = args.batches or (2 if px >= 512 and device.type == "cpu" else 12)
    if args.quick:
        batches = max(1, batches // 3)
    bs = cfg.batch_size
    timed = data.subset(np.arange(batches * bs))
    warm = data.subset(np.arange(batches * bs, batches * bs + bs))
    if args.channels_last:
        to_cl = torch.channels_last
        timed.x = timed.x.contiguous(memory_format=to_cl)
        warm.x = warm.x.contiguous(memory_format=to_cl)

    out: dict = {
        "px": px,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch_size": bs,
        "timed_images": len(timed),
        "phases": {},
    }
    for k, ph in enumerate(phases):
        t0 = time.perf_counter()
        run_phase(model, ph, opts[ph.name], warm, cfg, phase_generator(0, 0, k), device)
        _sync(device)
        t_warm = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        run_phase(model, ph, opts[ph.name], timed, cfg, phase_generator(0, 1, k), device)
        _sync(device)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        n_lab = int((~torch.isnan(timed.y)).any(dim=1).sum())
        seen = phase_size(ph, n_lab, len(timed), cfg)
        out["phases"][ph.name] = {
            "img_s": seen / dt,
            "img_cpu_s": seen / cpu,
            "warmup_s": t_warm,
            "epoch_images": phase_size(ph, LABELED, n_rows, cfg),
        }

    set_trainable(model, [])
    n_inf = len(timed)
    t0 = time.perf_counter()
    predict_tensor(model, timed.x[:64], batch_size=64)  # same batch shape as timed (compile)
    _sync(device)
    t_warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    with autocast(device, args.amp):
        predict_tensor(model, timed.x, batch_size=64)
    _sync(device)
    out["inference"] = {"img_s": n_inf / (time.perf_counter() - t0), "warmup_s": t_warm}

    ph_all = out["phases"].values()
    out["epoch_s"] = sum(v["epoch_images"] / v["img_s"] for v in ph_all)
    # Per CPU-second of this process: with one thread, what an idle dedicated core would do.
    out["epoch_cpu_s"] = sum(v["epoch_images"] / v["img_cpu_s"] for v in ph_all)
    out["rss_gb"] = rss_gb()
    if device.type == "cuda":
        out["cuda_peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    out["load"] = os.getloadavg()[0]
    return out


# ---------------------------------------------------------------------------------------------
# Driver


def _knob_args(args: argparse.Namespace) -> list[str]:
    a = [
        f"--stem-stride={args.stem_stride}",
        f"--branch-stem-stride={args.branch_stem_stride}",
        f"--amp={args.amp}",
        f"--threads={args.threads}",
        f"--batch-size={args.batch_size}",
        f"--width={args.width}",
        f"--device={args.device}",
        f"--batches={args.batches}",
    ]
    if args.compile:
        a.append("--compile")
    if args.channels_last:
        a.append("--channels-last")
    if args.quick:
        a.append("--quick")
    return a


def run_worker(px: int, knobs: list[str], timeout: float) -> dict:
    """Run one worker in a fresh subprocess; a crash or timeout becomes ``{"error": ...}``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--px", str(px), *knobs]
    env = {**os.environ, **MALLOC_ENV}
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"px": px, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(res.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (res.stderr or res.stdout).strip().splitlines()
    last = [t for t in tail if t.strip()][-1:] or ["no output"]
    return {"px": px, "error": f"exit {res.returncode}: {last[0][:200]}"}


def _describe(knobs: list[str]) -> str:
    return " ".join(k.lstrip("-") for k in knobs if not k.startswith(("--device", "--batches")))


def print_result(r: dict, label: str) -> None:
    if "error" in r:
        print(f"  {r['px']:>4} px  {label}: FAILED ({r['error']})")
        return
    ph = r["phases"]
    rates = "  ".join(f"{ph[p]['img_s']:7.1f}" for p in PHASES)
    print(
        f"  {r['px']:>4} px  {rates}  {r['inference']['img_s']:8.1f}  {r['epoch_s']:8.1f}  "
        f"{r['epoch_s'] * EPOCHS / 60:8.1f}  {r['rss_gb']:5.2f}  {r['load']:4.1f}  {label}"
    )


HEADER = (
    "    size  img/s: p1_prim  p2_auto  p3_fuse     infer   s/epoch  run_min  rss_GB  load  knobs"
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--px", type=int, nargs="+", default=[128, 640], help="input sizes")
    ap.add_argument("--quick", action="store_true", help="time fewer batches")
    ap.add_argument("--stem-stride", type=int, default=2, help="stride of the first conv")
    ap.add_argument(
        "--branch-stem-stride",
        type=int,
        default=1,
        help="stride of the attribute branches' first conv (0 = --stem-stride; params: 1)",
    )
    ap.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--compile", action="store_true", help="nn.Module.compile the model")
    ap.add_argument("--channels-last", action="store_true", help="channels_last weights/inputs")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--width", type=int, default=8, help="ModelConfig.width")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batches", type=int, default=0, help="timed batches (0 = by size)")
    ap.add_argument("--sweep", action="store_true", help="default, then each knob on its own")
    ap.add_argument("--timeout", type=float, default=1500.0, help="seconds per subprocess")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    ensure_malloc_env()
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return 0

    base = _knob_args(args)
    variants = [(_describe(base), base)]
    if args.sweep:
        threads = "--threads=2" if args.threads == 1 else "--threads=1"
        for knob in (
            "--stem-stride=4",
            "--branch-stem-stride=0",
            "--amp=bf16",
            threads,
            "--channels-last",
            "--compile",
        ):
            # Later flags override earlier ones, so the knob wins over the base setting.
            variants.append((f"base + {knob.lstrip('-')}", [*base, knob]))
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(
        f"xcryonet variant, SS epoch = {LABELED} labelled + {UNLABELED} unlabelled squares "
        "(phase sizes as in training: xcryonet.train.phase_size); run_min = 75 epochs "
        "(training loop only)"
    )
    print(HEADER)
    results = []
    for px in args.px:
        for label, knobs in variants:
            r = run_worker(px, knobs, args.timeout)
            results.append((px, label, r))
            print_result(r, label)
    print()
    for px, label, r in results:
        if "error" in r:
            continue
        note = ""
        if r["device"] == "cpu" and px >= 512:
            note = f" (extrapolated from {r['timed_images']} timed images per phase)"
        print(
            f"{px} px [{label}] on {r['device']} x{r['threads']} threads: "
            f"epoch {r['epoch_s']:.1f} s{note} ({r['epoch_cpu_s']:.1f} CPU-s: with 1 thread, the "
            f"wall time on an idle core); squares per phase "
            f"{', '.join(str(p['epoch_images']) for p in r['phases'].values())}; "
            f"warm-up (incl. compile) "
            f"{sum(p['warmup_s'] for p in r['phases'].values()):.1f} s"
        )
        if px == TARGET_PX:
            minutes = r["epoch_s"] * EPOCHS / 60
            verdict = "meets" if minutes <= TARGET_MIN else "misses"
            print(
                f"  full XCryoNet-SS run ({EPOCHS} epochs, {LABELED}+{UNLABELED}, {px} px): "
                f"{minutes:.1f} min, {verdict} the {TARGET_MIN:.0f}-min target; "
                f"{r['epoch_cpu_s'] * EPOCHS / 60:.1f} min in CPU time"
            )
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
