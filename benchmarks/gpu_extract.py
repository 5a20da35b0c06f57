"""Feature-extraction throughput on a CUDA GPU, through evalkit's own extraction path.

A torchvision ResNet-50 (random init) at batch 256 on synthetic 224x224 input, hooks on
``penultimate`` and ``layer3`` (:func:`evalkit.extract.run_layers`), fp32 against bf16
autocast. Each mode is warmed up first and timed between ``torch.cuda.synchronize()`` calls.
Input batches come from pinned host memory, as in a real extraction (minus image decoding);
a second set of rows feeds batches already on the device, which isolates the model.

Usage: ``python benchmarks/gpu_extract.py [OUT_JSON] [--batches N] [--warmup N]``
(default ``bench-results/gpu_extract.json``). Without CUDA it says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

BATCH_SIZE = 256
LAYERS = ("penultimate", "layer3")


def measure(model, batches, layer_map, *, device, bf16: bool, warmup: int) -> dict:
    """Images per second over ``batches`` (after ``warmup`` batches), through ``run_layers``."""
    import torch

    from evalkit.extract import run_layers

    pooling = SimpleNamespace(spatial="avg", tokens="cls")
    run_layers(model, batches[:warmup], layer_map, device=device, pooling=pooling, bf16=bf16)
    torch.cuda.synchronize()
    start = time.perf_counter()
    feats, _ = run_layers(model, batches, layer_map, device=device, pooling=pooling, bf16=bf16)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    n = sum(b.shape[0] for b in batches)
    return {"images": n, "seconds": round(seconds, 4), "images_per_s": round(n / seconds, 1),
            "feature_dims": {k: int(v.shape[1]) for k, v in feats.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default="bench-results/gpu_extract.json", help="JSON results file")
    p.add_argument("--batches", type=int, default=8, help="timed batches per mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches per mode")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    args = p.parse_args(argv)

    import torch
    import torchvision

    from evalkit.extract import resolve_layers

    if not torch.cuda.is_available():
        print("gpu_extract: no CUDA device; nothing measured", file=sys.stderr)
        return 0
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    layer_map = resolve_layers(model, LAYERS)
    host = torch.randn(args.batch_size, 3, 224, 224).pin_memory()
    on_device = host.to(device)
    rows = []
    for feed, x in (("host (pinned)", host), ("device", on_device)):
        batches = [x] * args.batches
        for mode, bf16, channels_last in (("fp32", False, False), ("bf16 autocast", True, False),
                                          ("bf16 + channels_last", True, True)):
            model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            r = measure(model, batches, layer_map, device=device, bf16=bf16, warmup=args.warmup)
            rows.append({"input": feed, "mode": mode, **r})
            torch.cuda.empty_cache()
    fp32 = {r["input"]: r["images_per_s"] for r in rows if r["mode"] == "fp32"}
    print(f"ResNet-50, batch {args.batch_size}, 224x224, layers {', '.join(LAYERS)} on {torch.cuda.get_device_name(0)}")
    print(f"{'input':<15} {'mode':<22} {'images/s':>10} {'vs fp32':>8}")
    for r in rows:
        print(f"{r['input']:<15} {r['mode']:<22} {r['images_per_s']:>10,.0f} {r['images_per_s'] / fp32[r['input']]:>7.2f}x")
    result = {
        "benchmark": "gpu_extract", "model": "torchvision resnet50 (random init)", "layers": list(LAYERS),
        "batch_size": args.batch_size, "input_size": [3, 224, 224], "timed_batches": args.batches,
        "warmup_batches": args.warmup, "rows": rows,
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark), "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "python": platform.python_version(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
