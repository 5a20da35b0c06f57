"""Images per second through evalkit's extraction path, on CPU and (when present) CUDA.

A torchvision ResNet-50 (random init, no download) on synthetic 224x224 batches, hooks on
``penultimate`` (:func:`evalkit.extract.run_layers`, the code ``evalkit report`` runs). On CPU:
fp32, and fp32 with channels_last. On CUDA: fp32, bf16 autocast, channels_last, bf16 +
channels_last (evalkit's default there is channels_last; bf16 is ``extract.bf16``), and with
``--compile`` also torch.compile; inputs come from pinned host memory with non-blocking copies,
as in a real run. Each mode is warmed up, then timed (CUDA between synchronisations).

Usage: ``python benchmarks/extract_throughput.py [OUT_JSON] [--batch-sizes 32,128,256]
[--batches N] [--warmup N] [--compile] [--cpu-only]``; writes
``bench-results/extract_throughput.json`` by default and prints a table. One short script:
on an H200, the default CUDA run (3 batch sizes x 4 modes) takes about a minute.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

LAYERS = ("penultimate",)


def measure(model, host_batch, layer_map, *, device, bf16: bool, channels_last: bool, compile: bool, batches: int,
            warmup: int) -> dict:
    """Images per second over ``batches`` copies of ``host_batch`` (after ``warmup``), via ``run_layers``."""
    import torch

    from evalkit.extract import run_layers

    pooling = SimpleNamespace(spatial="avg", tokens="cls")
    kw = dict(device=device, pooling=pooling, bf16=bf16, channels_last=channels_last, compile=compile)
    notes: list = []
    run_layers(model, [host_batch] * warmup, layer_map, log=notes.append, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    feats, _ = run_layers(model, [host_batch] * batches, layer_map, log=notes.append, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    n = batches * host_batch.shape[0]
    return {"images": n, "seconds": round(seconds, 4), "images_per_s": round(n / seconds, 1),
            "feature_dim": int(feats["penultimate"].shape[1]), "notes": notes}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default="bench-results/extract_throughput.json", help="JSON results file")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default: 32 on CPU; 64,128,256 on CUDA)")
    p.add_argument("--batches", type=int, default=None, help="timed batches per mode (default 2 on CPU, 10 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed batches per mode (default 1 on CPU, 3 on CUDA)")
    p.add_argument("--size", type=int, default=224, help="image side")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (CUDA)")
    p.add_argument("--cpu-only", action="store_true", help="skip CUDA even when present")
    args = p.parse_args(argv)

    import torch
    import torchvision

    from evalkit.extract import resolve_layers

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    layer_map = resolve_layers(model, LAYERS)
    cuda = torch.cuda.is_available() and not args.cpu_only
    plans = [("cpu", [("fp32", False, False, False), ("fp32 + channels_last", False, True, False)])]
    if cuda:
        modes = [("fp32", False, False, False), ("bf16 autocast", True, False, False),
                 ("channels_last", False, True, False), ("bf16 + channels_last", True, True, False)]
        if args.compile:
            modes.append(("bf16 + channels_last + compile", True, True, True))
        plans.append(("cuda", modes))
    rows = []
    for dev_name, modes in plans:
        device = torch.device(dev_name)
        on_cuda = device.type == "cuda"
        sizes = [int(s) for s in (args.batch_sizes or ("64,128,256" if on_cuda else "32")).split(",")]
        batches = args.batches or (10 if on_cuda else 2)
        warmup = args.warmup or (3 if on_cuda else 1)
        if on_cuda:
            torch.backends.cudnn.benchmark = True
        for bs in sizes:
            host = torch.randn(bs, 3, args.size, args.size)
            if on_cuda:
                host = host.pin_memory()
            for mode, bf16, channels_last, compile in modes:
                model.to(memory_format=torch.contiguous_format)
                r = measure(model, host, layer_map, device=device, bf16=bf16, channels_last=channels_last,
                            compile=compile, batches=batches, warmup=warmup)
                rows.append({"device": dev_name, "batch_size": bs, "mode": mode, **r})
                print(f"{dev_name:<5} batch {bs:>4}  {mode:<32} {r['images_per_s']:>9,.1f} img/s", flush=True)
            if on_cuda:
                torch.cuda.empty_cache()
        model.to("cpu")
    result = {
        "benchmark": "extract_throughput", "model": "torchvision resnet50 (random init)", "layers": list(LAYERS),
        "input_size": [3, args.size, args.size], "rows": rows,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
