"""Load-memory benchmark: peak resident memory of ``app.engine.store.load_dalle`` against the checkpoint size.

Writes a random ruDALL-E checkpoint of about ``--size-gb`` in the published format (``torch.save`` of
a state dict with upstream's tensor names and the three mask buffers, fp16 like the published files)
plus a ``model.json``, then loads it in a fresh subprocess with the real loader (meta build,
memory-mapped, tensor-by-tensor streaming) and reports:

- start-up overhead: the subprocess's RSS after ``import torch, app.engine.store``, before loading, and
  apart from it the one-time cost of torch's first meta-device build;
- load time and throughput (checkpoint GB / s), then a read of every parameter (a memory-mapped load is
  lazy: the read is what brings the weights in), timed separately;
- peak RSS (VmHWM) and its anonymous / file-backed parts, and the peak as a multiple of the checkpoint
  size after subtracting the start-up overhead. Target: peak < 1.3 x checkpoint + overhead.

The file is freshly written, so it is read from the page cache: the throughput is an upper bound for
a cold disk. The temporary directory is deleted afterwards unless ``--keep``.

    .venv/bin/python bench/load.py --size-gb 2
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Runnable as a script (`python bench/load.py`) as well as a module: make the repository importable.
if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_RATIO = 1.3
GB = 1e9
# The vqgan and realesrgan blocks only make the manifest complete; their files are never opened here.
KANDINSKY_VQGAN = {
    "checkpoint": "vae/absent.ckpt", "embed_dim": 256, "n_embed": 8192,
    "ddconfig": {"double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3, "out_ch": 3,
                 "ch": 128, "ch_mult": [1, 1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [32],
                 "dropout": 0.0},
}
KANDINSKY_REALESRGAN = {"checkpoint": "x4/absent.pth", "scale": 4, "num_feat": 64, "num_block": 23,
                        "num_grow_ch": 32}


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in bytes (Linux /proc/self/status)."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def layers_for_size(size_gb: float, hidden: int, element_bytes: int = 2) -> int:
    """Layer count whose checkpoint (embeddings, layers, head) is closest to ``size_gb``, at least 1."""
    from app.engine.nets.dalle import DalleConfig

    base = DalleConfig(num_layers=1, hidden_size=hidden, num_attention_heads=16)
    two = DalleConfig(num_layers=2, hidden_size=hidden, num_attention_heads=16)
    one_layer = checkpoint_bytes(two, element_bytes) - checkpoint_bytes(base, element_bytes)
    fixed = checkpoint_bytes(base, element_bytes) - one_layer
    return max(1, round((size_gb * GB - fixed) / one_layer))


def checkpoint_bytes(cfg: Any, element_bytes: int = 2) -> int:
    from app.engine.nets.dalle import expected_dalle_tensors

    return sum(math.prod(s) for s in expected_dalle_tensors(cfg).values()) * element_bytes


def write_model_dir(root: Path, cfg: Any, seed: int) -> Path:
    """A model directory holding only what load_dalle reads: model.json and the fp16 checkpoint."""
    import torch

    from app.engine.nets.dalle import MASK_BUFFERS, build_mask, expected_dalle_tensors

    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for name, shape in expected_dalle_tensors(cfg).items():
        sd[name] = torch.empty(shape, dtype=torch.float16).uniform_(-0.02, 0.02, generator=gen)
    for buffer in MASK_BUFFERS:
        sd[buffer] = build_mask(buffer.rsplit(".", 1)[1].removesuffix("_mask"), cfg)  # [S, S] bool
    ckpt = root / "dalle.bin"
    torch.save(sd, ckpt)
    dalle = {"checkpoint": ckpt.name, **cfg.__dict__}
    manifest = {
        "name": "load-bench",
        "dalle": dalle,
        "tokenizer": {"path": "tokenizer/absent.model"},
        "vqgan": KANDINSKY_VQGAN,
        "realesrgan": KANDINSKY_REALESRGAN,
        "ruclip": {"path": "absent-ruclip"},
    }
    (root / "model.json").write_text(json.dumps(manifest, indent=2))
    return ckpt


def child(model_dir: str, device: str, dtype_name: str) -> dict[str, Any]:
    """Runs in the fresh subprocess: measure the import overhead, then load and read every weight."""
    import torch

    import app.engine.store as store

    overhead = proc_status()
    # torch initialises the meta device (and imports what it needs) on first use: a one-time cost of
    # every start-up, measured apart so that it is not mistaken for a copy of the weights.
    from app.engine.nets.dalle import DalleConfig, DalleModel

    t0 = time.perf_counter()
    with torch.device("meta"):
        DalleModel(DalleConfig(num_layers=1, hidden_size=64, num_attention_heads=4))
    meta_init_s = time.perf_counter() - t0
    after_meta_init = proc_status()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    manifest = store.load_manifest(model_dir)
    device_map = None if device == "cpu" else {"": device}
    t0 = time.perf_counter()
    model = store.load_dalle(manifest, device_map, dtype)
    load_s = time.perf_counter() - t0
    after_load = proc_status()
    t0 = time.perf_counter()
    with torch.no_grad():
        # sum(dtype=) reads each tensor without materialising a converted copy of it.
        checksum = sum(float(p.sum(dtype=torch.float32)) for p in model.parameters())
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    read_s = time.perf_counter() - t0
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "overhead": overhead,
        "after_meta_init": after_meta_init,
        "meta_init_s": meta_init_s,
        "after_load": after_load,
        "after_read": proc_status(),
        "load_s": load_s,
        "read_s": read_s,
        "model_bytes": model_bytes,
        "checksum": checksum,
    }


def run_child(model_dir: Path, device: str, dtype: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(model_dir),
           "--device", device, "--load-dtype", dtype]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"loader subprocess failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(ckpt_bytes: int, r: dict[str, Any]) -> dict[str, Any]:
    overhead = r["overhead"]["VmRSS"]
    peak = r["after_read"]["VmHWM"]
    return {
        "checkpoint_gb": ckpt_bytes / GB,
        "model_gb": r["model_bytes"] / GB,
        "startup_rss_gb": overhead / GB,
        "meta_init_s": r["meta_init_s"],
        "meta_init_rss_gb": (r["after_meta_init"]["VmRSS"] - overhead) / GB,
        "load_s": r["load_s"],
        "load_gb_per_s": ckpt_bytes / GB / r["load_s"],
        "read_s": r["read_s"],
        "load_and_read_gb_per_s": ckpt_bytes / GB / (r["load_s"] + r["read_s"]),
        "rss_after_load_gb": r["after_load"]["VmRSS"] / GB,
        "anon_after_load_gb": r["after_load"]["RssAnon"] / GB,
        "peak_rss_gb": peak / GB,
        "peak_anon_gb_at_end": r["after_read"]["RssAnon"] / GB,
        "file_backed_gb_at_end": r["after_read"]["RssFile"] / GB,
        "peak_over_checkpoint": (peak - overhead) / ckpt_bytes,
        "peak_over_checkpoint_after_meta_init": (peak - r["after_meta_init"]["VmRSS"]) / ckpt_bytes,
        "target": f"peak < {TARGET_RATIO} x checkpoint + start-up overhead",
        "meets_target": peak < TARGET_RATIO * ckpt_bytes + overhead,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Peak memory of the streaming checkpoint loader")
    ap.add_argument("--size-gb", type=float, default=2.0, help="checkpoint size to generate")
    ap.add_argument("--hidden", type=int, default=2048, help="hidden size (heads = hidden / 128)")
    ap.add_argument("--layers", type=int, help="layer count (default: chosen to reach --size-gb)")
    ap.add_argument("--device", default="cpu", help="where load_dalle puts the weights (cpu or cuda:N)")
    ap.add_argument("--load-dtype", default="fp16", choices=["fp16", "bf16", "fp32"],
                    help="dtype to load into (the checkpoint is fp16 like the published files)")
    ap.add_argument("--dir", help="parent of the temporary model directory (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    ap.add_argument("--out", help="also write the JSON report here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print(json.dumps(child(args.child, args.device, args.load_dtype)))
        return 0

    from app.engine.nets.dalle import DalleConfig

    layers = args.layers or layers_for_size(args.size_gb, args.hidden)
    cfg = DalleConfig(num_layers=layers, hidden_size=args.hidden, num_attention_heads=args.hidden // 128)
    root = Path(tempfile.mkdtemp(prefix="load-bench-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        ckpt = write_model_dir(root, cfg, seed=0)
        write_s = time.perf_counter() - t0
        size = ckpt.stat().st_size
        print(f"wrote {ckpt} ({size / GB:.2f} GB, {layers} layers x hidden {args.hidden}) in {write_s:.1f} s")
        result = report(size, run_child(root, args.device, args.load_dtype))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    result.update(layers=layers, hidden=args.hidden, device=args.device, load_dtype=args.load_dtype)
    for key, value in result.items():
        print(f"{key:>26}: {value:.3f}" if isinstance(value, float) else f"{key:>26}: {value}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
