"""Decode speed of Kandinsky's real shape on one CUDA GPU, against the memory-bandwidth bound.

Random fp16 weights are materialised directly on the GPU (built on the meta device, then ``to_empty``
and initialised in place), so no checkpoint is needed. For each batch size the decoder
(``ImageTokenDecoder``, windowed cache, step capture when supported) generates one full image grid;
ms per step comes from the steady part of the run (after the first progress report, which covers the
prefill and graph capture). Bytes per step are every layer's weights, the head's image rows and the
KV cache visible at that step (``app.engine.placement.bytes_read_per_step``): the least any implementation
must read, so the fraction of the bound is conservative.

Each batch size runs in each of ``--modes``: ``eager`` (no capture) and ``graphs`` (the decoder's
own CUDA-graph capture of the one-token step, ``capture_graphs``). ``torch.compile`` is not measured:
the decoder has no ``torch.compile(mode="reduce-overhead")`` path today (its step capture is the manual
CUDA-graph one), which the JSON notes.

With ``--model_dir`` it also times the default request (8 images, 4 kept, upscaled) through
``app.engine.pipeline.Pipeline`` end to end.

One command on an H100/H200 writes everything (``gpu_decode.json``, ``gpu_decode.txt``) to one folder:

    python bench/gpu_decode.py --out DIR

Without a visible CUDA GPU it prints why, writes nothing and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Runnable as a script (`python bench/gpu_decode.py`) as well as a module: make the repository importable.
if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.engine.nets.dalle import DALLE_PRESETS, DalleConfig, DalleModel  # noqa: E402
from app.engine.placement import bytes_read_per_step, kv_cache_bytes  # noqa: E402

# Peak memory bandwidth in GB/s by device name, most specific first (vendor data sheets).
BANDWIDTH_GBS: tuple[tuple[str, float], ...] = (
    ("H200", 4800),
    ("H100 NVL", 3900),
    ("H100 PCIE", 2000),
    ("H100", 3350),
    ("A100-SXM4-80GB", 2039),
    ("A100 80GB PCIE", 1935),
    ("A100", 1555),
    ("V100", 900),
)
TARGET_FRACTION_AT_8 = 0.70
# --preset smoke: a shape small enough to run the script end to end on a CPU in seconds.
SMOKE = DalleConfig(num_layers=2, hidden_size=64, num_attention_heads=4, text_seq_length=16,
                    image_tokens_per_dim=8, vocab_size=256, image_vocab_size=64)
DEFAULT_QUERY = "котик в космосе"
MODES = ("eager", "graphs")
TORCH_COMPILE_NOTE = ("not measured: ImageTokenDecoder has no torch.compile(mode='reduce-overhead') path; "
                      "its step capture is manual CUDA graphs (capture_graphs), the 'graphs' mode")


def bandwidth_for(device_name: str) -> float | None:
    """The table's bandwidth for a ``torch.cuda.get_device_name`` string, or None if unknown."""
    name = device_name.upper()
    for key, gbs in BANDWIDTH_GBS:
        if key in name:
            return gbs
    return None


def bound_fraction(bytes_per_step: float, ms_per_step: float, bandwidth_gbs: float | None) -> float:
    """How close a step time is to reading ``bytes_per_step`` at full bandwidth (1.0 = at the bound)."""
    if not bandwidth_gbs or ms_per_step <= 0:
        return math.nan
    bound_ms = bytes_per_step / (bandwidth_gbs * 1e9) * 1e3
    return bound_ms / ms_per_step


def mean_bytes(
    cfg: DalleConfig, dtype: torch.dtype, batch: int, first: int, last: int, windowed: bool
) -> float:
    """Mean bytes per step over steps first..last-1."""
    steps = range(first, last)
    return sum(bytes_read_per_step(cfg, dtype, batch, s, windowed) for s in steps) / max(len(steps), 1)


def random_model_on(cfg: DalleConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> DalleModel:
    """Kandinsky-shaped model with random weights created on ``device`` without a host copy."""
    with torch.device("meta"):
        model = DalleModel(cfg).to(dtype)
    model = model.to_empty(device=device).eval()
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):  # layer norms
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model


def time_decode(model: DalleModel, batch: int, *, windowed: bool, capture_graphs: bool) -> dict[str, Any]:
    """Generate one image grid for ``batch`` images; returns timings of the steady steps."""
    from app.engine.nets.decoding import GenerationRequest, ImageTokenDecoder, SamplingParams

    cfg = model.cfg
    decoder = ImageTokenDecoder(model, batch, windowed=windowed, capture_graphs=capture_graphs)
    text = torch.zeros(cfg.text_seq_length, dtype=torch.long)
    text[:4] = torch.tensor([2, 10, 20, 3])
    sampling = SamplingParams(top_k=min(2048, cfg.image_vocab_size), top_p=0.975, temperature=1.0)
    request = GenerationRequest(text, batch, sampling, seed=0)
    marks: list[tuple[int, float]] = []

    def on_step(tick: Any) -> None:
        if model_device.type == "cuda":
            torch.cuda.synchronize(model_device)
        marks.append((tick.steps, time.perf_counter()))

    model_device = next(model.parameters()).device
    if model_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model_device)
    t0 = time.perf_counter()
    decoder.generate([request], on_step=on_step)
    total_s = time.perf_counter() - t0
    (s0, t_first), (s1, t_last) = marks[0], marks[-1]
    ms_per_step = (t_last - t_first) / max(s1 - s0, 1) * 1e3
    return {
        "batch": batch,
        "steps_timed": [s0, s1],
        "ms_per_step": ms_per_step,
        "generate_s": total_s,
        "step_capture": decoder.capture_graphs,
        "peak_memory_gib": (torch.cuda.max_memory_allocated(model_device) / 2**30
                            if model_device.type == "cuda" else None),
    }


def invariance_check(model: DalleModel, batches: list[int], *, capture_graphs: bool) -> list[dict[str, Any]]:
    """A 2-image request alone and merged into batches of ``batches`` images (a decoder of the largest
    capacity, as the server keeps one): how many of its codes differ, with batch invariance on and off."""
    from app.engine.nets.decoding import GenerationRequest, ImageTokenDecoder, SamplingParams

    cfg = model.cfg
    sampling = SamplingParams(top_k=min(4096, cfg.image_vocab_size), top_p=0.975, temperature=1.0)

    def req(images: int, seed: int) -> GenerationRequest:
        text = torch.zeros(cfg.text_seq_length, dtype=torch.long)
        text[:4] = torch.tensor([2, 10 + seed % 50, 20, 3])
        return GenerationRequest(text, images, sampling, seed=seed)

    rows = []
    for invariant in (True, False):
        decoder = ImageTokenDecoder(model, max(batches), capture_graphs=capture_graphs,
                                    batch_invariant=invariant)
        alone = decoder.generate([req(2, 7)])[0]
        assert alone is not None
        for batch in batches:
            out = decoder.generate([req(batch - 2, 100 + batch), req(2, 7)])[1] if batch > 2 else alone
            assert out is not None
            rows.append({"batch_invariant": invariant, "batch": batch,
                         "codes_differing": int((out.codes != alone.codes).sum()),
                         "ppl_equal": bool(torch.equal(out.ppl, alone.ppl))})
        decoder.release_caches()
    return rows


def end_to_end(model_dir: str, device: str, seed: int) -> dict[str, Any]:
    """The default request (8 images, 4 kept, upscaled) through the real pipeline, twice (cold, warm)."""
    from app.engine.params import GenerationParams
    from app.engine.pipeline import Job, Pipeline

    t0 = time.perf_counter()
    pipe = Pipeline.load(model_dir, device=device)
    load_s = time.perf_counter() - t0
    params = GenerationParams(top_k=min(4096, pipe.image_vocab_size), seed=seed)
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        (result,) = pipe.run([Job(DEFAULT_QUERY, params)])
        runs.append({"total_s": time.perf_counter() - t0, "timings": result.timings})
    return {"model_dir": model_dir, "load_s": load_s, "cold": runs[0], "warm": runs[1]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="kandinsky", choices=[*sorted(DALLE_PRESETS), "smoke"])
    ap.add_argument("--num-layers", type=int, help="override the preset's layer count (smoke runs)")
    ap.add_argument("--batches", default="1,8,16,32", help="comma-separated batch sizes")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--device", default="cuda:0", help="a CUDA device; 'cpu' only for smoke runs")
    ap.add_argument("--full-cache", action="store_true", help="disable the windowed row-layer cache")
    ap.add_argument("--bandwidth-gbs", type=float, help="peak memory bandwidth (default: by device name)")
    ap.add_argument("--model_dir", help="also time the default request end to end through the pipeline")
    ap.add_argument("--invariance-batches", default="8,16,32",
                    help="batch sizes a request is merged into for the batch-invariance check ('' skips it)")
    ap.add_argument("--invariance-layers", type=int, default=4,
                    help="layers of the model for that check (full width: the shapes that matter)")
    ap.add_argument("--out", default="out/gpu_decode", help="folder for gpu_decode.json and gpu_decode.txt")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/gpu_decode.py needs a CUDA GPU and none is visible here: nothing measured, nothing "
              "written (for a CPU smoke run: --preset smoke --device cpu).", file=sys.stderr)
        return 0
    modes = [m for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        print(f"--modes: expected a comma-separated subset of {', '.join(MODES)}, got {args.modes!r}",
              file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    cfg = SMOKE if args.preset == "smoke" else DALLE_PRESETS[args.preset]
    if args.num_layers:
        cfg = DalleConfig(**{**cfg.__dict__, "num_layers": args.num_layers})
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    windowed = not args.full_cache
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    bandwidth = args.bandwidth_gbs or bandwidth_for(name)

    say(f"{name}, {args.preset} ({cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} heads), {args.dtype}, bandwidth {bandwidth} GB/s, "
        f"torch {torch.__version__}")
    model = random_model_on(cfg, device, dtype)
    rows = []
    for batch in batches:
        for mode in modes:
            row = time_decode(model, batch, windowed=windowed, capture_graphs=mode == "graphs")
            row["mode"] = mode
            first, last = row["steps_timed"]
            row["mb_per_step"] = mean_bytes(cfg, dtype, batch, first, last, windowed) / 1e6
            row["kv_cache_gib"] = kv_cache_bytes(cfg, batch, dtype, windowed) / 2**30
            row["bound_fraction"] = bound_fraction(row["mb_per_step"] * 1e6, row["ms_per_step"], bandwidth)
            row["images_per_s"] = batch / (row["ms_per_step"] * cfg.image_seq_length / 1e3)
            rows.append(row)
            print(f"batch {batch} {mode}: {row['ms_per_step']:.2f} ms/step", flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    inv_batches = [int(b) for b in args.invariance_batches.split(",") if b.strip()]
    invariance: list[dict[str, Any]] = []
    if inv_batches:
        small = DalleConfig(**{**cfg.__dict__, "num_layers": min(cfg.num_layers, args.invariance_layers)})
        inv_model = random_model_on(small, device, dtype, seed=1)
        invariance = invariance_check(inv_model, inv_batches, capture_graphs="graphs" in modes)
        del inv_model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    result: dict[str, Any] = {
        "device": name,
        "bandwidth_gbs": bandwidth,
        "torch": torch.__version__,
        "config": {"preset": args.preset, "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
                   "num_attention_heads": cfg.num_attention_heads},
        "dtype": args.dtype,
        "kv_cache": "windowed" if windowed else "full",
        "decode": rows,
        "torch_compile": TORCH_COMPILE_NOTE,
        "target": {"batch": 8, "bound_fraction": TARGET_FRACTION_AT_8},
        "invariance": invariance,
    }
    header = ("batch", "mode", "ms/step", "MB/step", "bound", "img/s", "capture", "peak GiB")
    say("{:>5} {:>7} {:>9} {:>9} {:>7} {:>7} {:>8} {:>9}".format(*header))
    for r in rows:
        peak = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        say(f"{r['batch']:>5} {r['mode']:>7} {r['ms_per_step']:>9.2f} {r['mb_per_step']:>9.0f} "
            f"{r['bound_fraction']:>7.1%} {r['images_per_s']:>7.2f} {r['step_capture']!s:>8} {peak:>9}")
    say(f"torch.compile: {TORCH_COMPILE_NOTE}")
    for r in invariance:
        say(f"invariance: batch_invariant={r['batch_invariant']} merged into {r['batch']}: "
            f"{r['codes_differing']} codes differ from alone, ppl equal {r['ppl_equal']}")
    at8 = [r for r in rows if r["batch"] == 8 and not math.isnan(r["bound_fraction"])]
    if at8:
        best = max(at8, key=lambda r: r["bound_fraction"])
        verdict = "meets" if best["bound_fraction"] >= TARGET_FRACTION_AT_8 else "misses"
        say(f"batch 8 ({best['mode']}) {verdict} the {TARGET_FRACTION_AT_8:.0%} target")

    if args.model_dir:
        result["end_to_end"] = end_to_end(args.model_dir, args.device, seed=0)
        e2e = result["end_to_end"]
        say(f"default request end to end: cold {e2e['cold']['total_s']:.1f} s, "
            f"warm {e2e['warm']['total_s']:.1f} s ({e2e['warm']['timings']})")
    (out_dir / "gpu_decode.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out_dir / "gpu_decode.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {out_dir / 'gpu_decode.json'} and {out_dir / 'gpu_decode.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
