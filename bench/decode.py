"""Decode-speed benchmark (not a test): our KV-cached decoder against upstream's generation algorithm.

    .venv/bin/python bench/decode.py                       # CPU: 8 layers, hidden 256, 4 images
    .venv/bin/python bench/decode.py --device cuda --config kandinsky --dtype fp16 --baseline-steps 0

Ours: ms per decode step and images/s of ``ImageTokenDecoder``. Baseline: a re-implementation of the
algorithm of upstream ``rudalle.pipelines.generate_images`` with ``use_cache=True`` (re-embed the whole
sequence every step, qkv for the new position only but torch.cat of K/V/output caches, the full
[S, S] mask product in every layer, layer norms and to_logits over every position, HF top-k/top-p and
torch.multinomial), run for the first ``--baseline-steps`` image steps; the speed ratio compares the
same steps. On CUDA the bandwidth bound is printed: bytes read per step (weights + the KV cache read
that step) divided by the device's memory bandwidth.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

# `make bench-decode` runs this file as a script: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.nets.dalle import (  # noqa: E402
    DALLE_PRESETS,
    DalleConfig,
    DalleModel,
    build_mask,
    layer_mask_kind,
    row_window,
)
from app.nets.decoding import GenerationRequest, ImageTokenDecoder, SamplingParams  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Peak HBM bandwidth, GB/s, by a substring of torch.cuda.get_device_name().
BANDWIDTH_GBS = [("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100-SXM4-80GB", 2039.0),
                 ("A100 80GB", 2039.0), ("A100", 1555.0), ("V100", 900.0)]


class _Stop(Exception):
    pass


def build_model(cfg: DalleConfig, device: torch.device, dtype: torch.dtype, seed: int) -> DalleModel:
    """Random weights, materialised directly on ``device`` in ``dtype`` (no full-size CPU copy)."""
    with torch.device("meta"):
        model = DalleModel(cfg)
    model = model.to(dtype).to_empty(device=device).eval()
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.normal_(0.0, 0.02 if cfg.hidden_size > 1024 else 0.2, generator=gen)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ours(model: DalleModel, text: torch.Tensor, args: argparse.Namespace,
              steps: int) -> tuple[float, list[tuple[int, float]]]:
    """Run our decoder for ``steps`` steps; returns (prefill seconds, [(step, seconds since start)])."""
    cfg = model.cfg
    device = next(model.parameters()).device
    dec = ImageTokenDecoder(model, args.batch, windowed=args.windowed, microbatches=args.microbatches,
                            compile_step=args.compile_step)
    # On the CPU every step can be timed; on CUDA only every 32 steps, each with a sync.
    dec.progress_every = 1 if device.type == "cpu" else 32
    sp = SamplingParams(min(4096, cfg.image_vocab_size), 0.975, 1.0)
    req = GenerationRequest(text, args.batch, sp, seed=0)
    marks: list[tuple[int, float]] = []

    def on_step(step: int) -> None:
        sync(device)
        marks.append((step, time.perf_counter() - start))
        if step >= steps:
            raise _Stop

    sync(device)
    start = time.perf_counter()
    try:
        dec.generate([req], on_step=on_step)
    except _Stop:
        pass
    return marks[0][1], marks


def upstream_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """HF's classic top_k_top_p_filtering, in place on [B, V] as upstream calls it."""
    kth = torch.topk(logits, top_k)[0][..., -1, None]
    logits[logits < kth] = -math.inf
    if top_p < 1.0:
        sorted_logits, sorted_ids = torch.sort(logits, descending=True)
        cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits[remove.scatter(1, sorted_ids, remove)] = -math.inf
    return logits


def upstream_generate(model: DalleModel, text: torch.Tensor, batch: int, steps: int,
                      on_step: Callable[[int], None]) -> torch.Tensor:
    """Upstream's cached generation loop (v3), step for step; returns the sampled codes [B, steps]."""
    cfg = model.cfg
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    hd, nh = cfg.head_dim, cfg.num_attention_heads
    total = cfg.total_seq_length
    attention_mask = torch.tril(torch.ones(batch, 1, total, total, device=device))  # [B, 1, S, S]
    layer_masks = [build_mask(layer_mask_kind(i, cfg.num_layers), cfg).to(device)
                   for i in range(cfg.num_layers)]
    out = text.to(device).unsqueeze(0).repeat(batch, 1)  # [B, S]
    cache: dict[int, tuple[torch.Tensor, ...]] = {}
    gen = torch.Generator(device).manual_seed(0)
    last = cfg.num_layers - 1
    for step in range(steps):
        x = model.embed_text(out[:, : cfg.text_seq_length])
        if out.shape[1] > cfg.text_seq_length:
            x = torch.cat((x, model.embed_image(out[:, cfg.text_seq_length :], 0)), dim=1)  # [B, S, h]
        s = x.shape[1]
        for i, layer in enumerate(model.transformer.layers):
            mask = torch.mul(attention_mask[:, :, :s, :s], layer_masks[i][:s, :s]).to(dtype)  # [B, 1, S, S]
            past = cache.get(i)
            cached = 0 if past is None else past[0].shape[-2]
            h = layer.input_layernorm(x)  # [B, S, h]
            q, k, v = layer.qkv(h[:, cached:])  # [B, nh, T, hd]
            if past is not None:
                k, v = torch.cat((past[0], k), dim=-2), torch.cat((past[1], v), dim=-2)
            scores = torch.matmul(q / math.sqrt(hd), k.transpose(-1, -2))  # [B, nh, T, S]
            ltor = mask[:, :, -scores.shape[-2] :]
            scores = torch.mul(scores, ltor) - 10000.0 * (1.0 - ltor)
            scaled = scores / 32  # pb-relax
            maxes = scaled.view(batch, nh, -1).max(dim=-1).values[..., None, None]
            probs = torch.softmax((scaled - maxes) * 32, dim=-1)
            ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).reshape(batch, -1, cfg.hidden_size)
            att = layer.attention.dense(ctx).clamp(-65504, 65504)  # [B, T, h]
            if past is not None:
                att = torch.cat((past[2], att), dim=-2)  # [B, S, h]
            x = x + layer.before_first_addition_layernorm(att)
            h2 = layer.post_attention_layernorm(x)  # [B, S, h]
            if past is not None:
                older = past[3] if i == last else h2[:, :cached]
                mlp = torch.cat((older, layer.mlp(h2[:, cached:])), dim=-2)
            else:
                mlp = layer.mlp(h2)
            cache[i] = (k, v, att, mlp) if i == last else (k, v, att)
            x = x + layer.before_second_addition_layernorm(mlp)
        logits = model.to_logits(model.transformer.final_layernorm(x))  # [B, S, V], every position
        logits = logits[:, -1, cfg.vocab_size :]
        logits /= 1.0  # temperature
        filtered = upstream_filter(logits, min(4096, cfg.image_vocab_size), 0.975)
        sample = torch.multinomial(torch.softmax(filtered, dim=-1), 1, generator=gen)  # [B, 1]
        out = torch.cat((out, sample), dim=-1)
        on_step(step + 1)
    return out[:, cfg.text_seq_length :]


def weight_bytes_per_step(model: DalleModel) -> int:
    """Weights one step reads: every layer, the final norms and the image columns of to_logits."""
    cfg = model.cfg
    size = next(model.parameters()).element_size()
    layers = sum(p.numel() for p in model.transformer.layers.parameters())
    norms = 4 * cfg.hidden_size
    head = cfg.image_vocab_size * (cfg.hidden_size + 1)
    return (layers + norms + head) * size


def kv_bytes(model: DalleModel, batch: int, windowed: bool, steps: int) -> float:
    """Mean KV-cache bytes read per step over the first ``steps`` steps."""
    cfg = model.cfg
    size = next(model.parameters()).element_size()
    per_key = 2 * batch * cfg.hidden_size * size  # k and v, all heads
    ring = cfg.text_seq_length + row_window(cfg)
    total = 0.0
    for i in range(cfg.num_layers):
        windowed_layer = windowed and layer_mask_kind(i, cfg.num_layers) == "row"
        for step in range(1, steps + 1):
            total += per_key * (ring if windowed_layer else cfg.n_text + step)
    return total / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(DALLE_PRESETS), help="published shapes, random weights")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1024, help="decode steps timed for ours (<= 1024)")
    ap.add_argument("--baseline-steps", type=int, default=256, help="upstream baseline steps (0: skip)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--windowed", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--microbatches", type=int, default=1)
    ap.add_argument("--compile-step", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--bandwidth-gbs", type=float, default=0.0, help="device memory bandwidth (CUDA bound)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.config:
        cfg = DALLE_PRESETS[args.config]
    else:
        cfg = DalleConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model = build_model(cfg, device, dtype, seed=0)
    text = torch.zeros(cfg.text_seq_length, dtype=torch.long)
    text[:6] = torch.tensor([2, 500, 1200, 77, 9000, 3])
    steps = min(args.steps, cfg.image_seq_length)
    print(f"model: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {args.dtype} on {device}, "
          f"batch {args.batch}, windowed={args.windowed}, microbatches={args.microbatches}, "
          f"threads={torch.get_num_threads()}")

    with torch.inference_mode():
        prefill, marks = time_ours(model, text, args, steps)
    (s0, t0), (s1, t1) = marks[0], marks[-1]
    ms_step = 1000 * (t1 - t0) / max(1, s1 - s0)
    print(f"ours: prefill+first token {1000 * prefill:.1f} ms, {ms_step:.2f} ms/step over steps {s0}..{s1}")
    if s1 >= cfg.image_seq_length:
        print(f"ours: {args.batch / t1:.3f} images/s ({t1:.2f} s for {args.batch} images, 1024 steps)")

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        bw = args.bandwidth_gbs or next((v for k, v in BANDWIDTH_GBS if k in name), 0.0)
        wb, kb = weight_bytes_per_step(model), kv_bytes(model, args.batch, args.windowed, steps)
        if bw:
            bound_ms = 1000 * (wb + kb) / (bw * 1e9)
            print(f"bound on {name} ({bw:.0f} GB/s): {wb / 1e9:.2f} GB weights + {kb / 1e9:.3f} GB KV "
                  f"per step -> {bound_ms:.2f} ms/step; measured {ms_step:.2f} ms/step "
                  f"({100 * bound_ms / ms_step:.0f}% of the bound)")
        else:
            print(f"unknown bandwidth for {name}: pass --bandwidth-gbs")

    if args.baseline_steps > 0:
        n = min(args.baseline_steps, cfg.image_seq_length)
        base_marks: list[tuple[int, float]] = []
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            upstream_generate(model, text, args.batch, n,
                              lambda k: base_marks.append((k, time.perf_counter() - start)))
        sync(device)
        base_total = time.perf_counter() - start
        ours_n = next((t for k, t in marks if k >= n), None)
        print(f"upstream algorithm: {base_total:.2f} s for the first {n} steps "
              f"({1000 * base_total / n:.1f} ms/step)")
        if ours_n is not None:
            print(f"ours: {ours_n:.2f} s for the same {n} steps -> speed-up {base_total / ours_n:.1f}x")


if __name__ == "__main__":
    main()
