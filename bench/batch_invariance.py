"""What batch invariance costs the decoder, and whether it holds (issue 18).

Decodes batches of 1, 4, 8, 12 and 16 images (1024 positions each, Kandinsky's 8192 image codes,
top_k 4096, top_p 0.975) on a seeded random model of 8 layers, hidden 256 and 4 heads, with
`batch_invariant` on and off: ms per decode step and images per second, medians of `--runs`. Then the
invariance itself: a 4-image request alone and merged with 2, 8 and 12 other images, codes compared
with invariance on and off.

    python bench/batch_invariance.py --runs 3 --out out/bench-batch-invariance.json

Needs an idle machine: contention moves the numbers more than the difference being measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

# `make bench-invariance` runs this file as a script: make the repository root importable.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from app.engine.nets.dalle import DalleConfig, DalleModel  # noqa: E402
from app.engine.nets.decoding import GenerationRequest, ImageTokenDecoder, SamplingParams  # noqa: E402

CFG = DalleConfig(num_layers=8, hidden_size=256, num_attention_heads=4, text_seq_length=128,
                  image_tokens_per_dim=32, vocab_size=1024 + 128, image_vocab_size=8192)
SAMPLING = SamplingParams(top_k=4096, top_p=0.975, temperature=1.0)
BATCHES = (1, 4, 8, 12, 16)
PARTNERS = (2, 8, 12)


def make_model(seed: int = 0, std: float = 0.05) -> DalleModel:
    model = DalleModel(CFG).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            p.copy_(1.0 + noise if name.endswith("weight") and p.dim() == 1 else noise)
    return model


def text(seed: int, length: int = 12) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(CFG.text_seq_length, dtype=torch.long)
    ids[:length] = torch.randint(4, 1000, (length,), generator=gen)
    ids[0], ids[length - 1] = 2, 3
    return ids


def request(images: int, seed: int) -> GenerationRequest:
    return GenerationRequest(text(seed), images, SAMPLING, seed)


def timing(model: DalleModel, runs: int) -> list[dict[str, float]]:
    rows = []
    for invariant in (False, True):
        decoder = ImageTokenDecoder(model, 16, batch_invariant=invariant)
        for batch in BATCHES:
            seconds = []
            for run in range(runs):
                t0 = time.perf_counter()
                decoder.generate([request(batch, seed=run)])
                seconds.append(time.perf_counter() - t0)
            median = statistics.median(seconds)
            row = {"batch_invariant": invariant, "batch": batch, "seconds": [round(s, 3) for s in seconds],
                   "ms_per_step": round(median / CFG.image_seq_length * 1000, 3),
                   "images_per_s": round(batch / median, 4)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def invariance(model: DalleModel) -> list[dict[str, object]]:
    out = []
    for invariant in (False, True):
        decoder = ImageTokenDecoder(model, 16, batch_invariant=invariant)
        alone = decoder.generate([request(4, seed=7)])[0]
        assert alone is not None
        for partners in PARTNERS:
            merged = decoder.generate([request(partners, seed=100 + partners), request(4, seed=7)])[1]
            assert merged is not None
            differing = [int((merged.codes[i] != alone.codes[i]).sum()) for i in range(4)]
            row = {"batch_invariant": invariant, "partners": partners, "codes_differing_per_image": differing,
                   "ppl_equal": bool(torch.equal(merged.ppl, alone.ppl))}
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = make_model()
    with torch.inference_mode():
        rows = timing(model, args.runs)
        checks = invariance(model)
    by = {(r["batch_invariant"], r["batch"]): r for r in rows}
    cost = {b: round(by[(True, b)]["ms_per_step"] / by[(False, b)]["ms_per_step"] - 1, 4) for b in BATCHES}
    print("slow-down with batch invariance, by batch:", json.dumps(cost))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {"threads": args.threads, "runs": args.runs, "timing": rows, "slowdown": cost,
                  "invariance": checks, "torch": torch.__version__}
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
