"""Decode-speed benchmark (not a test): ours against the published ruDALL-E package, on the CPU.

    .venv/bin/python bench/decode.py --threads 2 --runs 3 --out out/decode.json
    .venv/bin/python bench/decode.py --profile            # cProfile of one request, top 25 by self time
    .venv/bin/python bench/decode.py --profile torch      # the same with torch.profiler (per op)

Upstream is the real ``rudalle==1.1.3`` (``bench/upstream.py`` installs it with ``--no-deps`` into
``.venv-bench`` on first use; it is not a dependency of the server, the tests or CI): its own
``DalleModel`` forward with ``use_cache=True`` driven by the sampling loop of its
``rudalle.pipelines.generate_images`` (which cannot be imported without matplotlib, taming and the
full transformers stack, so its loop body is reproduced line for line below, calling upstream's model
and the ``transformers.top_k_top_p_filtering`` of the version upstream pins).

Both sides run the same weights: a random model of Kandinsky's vocabulary and sequence layout with
``--layers``/``--hidden``/``--heads`` (default 8 / 256 / 8) is written as a model directory in the
published formats (``app.tools.tiny``'s components, upstream's tensor names), ours loads it with
``app.engine.pipeline.Pipeline.load`` and upstream's ``DalleModel`` loads the same checkpoint file with
``load_state_dict`` (every tensor, strictly; the three mask buffers are upstream's own, and are checked
against the file's). fp32, the same torch thread count, ``--batch`` images (default 4), all 1024 steps,
Kandinsky's default sampling (top_k 4096, top_p 0.975, temperature 1). Timed, ``--runs`` times each
(medians reported):

- ours, sampler: ``ImageTokenDecoder.generate`` (the pipeline's decoder) for the batch;
- ours, whole request: ``Pipeline.run`` for one job of ``--batch`` images (sampling, VQ-GAN decode,
  ruCLIP rank, JPEG encode; super_res off);
- upstream: its sampling loop alone (prefill included, as its first step is the text pass). Its
  ``generate_images`` then runs one more uncached forward over the whole sequence for the ppl
  scores; that is timed separately and not added to the loop.

Before timing, a parity check: greedy (top_k 1) codes of upstream's loop and of ours for one image,
all 1024 positions.

Measure on an otherwise idle machine: with other processes on the cores, torch's OpenMP threads wait
on each other and both sides slow down several-fold and unevenly (on the 2-core development machine a
busy spell gave 4.7x where the idle machine gives 25x).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import platform
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# `make bench-decode` runs this file as a script: make the repository root importable.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from app.engine.nets.dalle import MASK_BUFFERS, DalleConfig, build_mask, expected_dalle_tensors  # noqa: E402
from app.engine.nets.decoding import GenerationRequest, SamplingParams, Tick  # noqa: E402
from app.engine.params import (  # noqa: E402
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    GenerationParams,
)
from app.engine.pipeline import Job, Pipeline  # noqa: E402
from app.tools.tiny import build_tiny_model_dir, random_state_dict  # noqa: E402
from bench.upstream import PINS, Upstream  # noqa: E402
from bench.upstream import load as load_upstream  # noqa: E402

DEFAULT_QUERY = "синий кот сидит на окне"


class _Stop(Exception):
    pass


# ----------------------------------------------------------------------------------- the model


def write_model_dir(root: Path, layers: int, hidden: int, heads: int, seed: int) -> Path:
    """A complete model directory (tokenizer, VQ-GAN, ruCLIP, RealESRGAN from ``app.tools.tiny``) whose
    transformer has Kandinsky's vocabularies and sequence layout at the given depth and width."""
    cfg = DalleConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=heads)
    build_tiny_model_dir(root, seed, image_vocab_size=cfg.image_vocab_size, name="bench-decode")
    manifest_path = root / "model.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    block = manifest["dalle"]
    block.update(num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                 vocab_size=cfg.vocab_size, image_vocab_size=cfg.image_vocab_size)
    cfg = DalleConfig.from_manifest(block)
    gen = torch.Generator("cpu").manual_seed(seed)
    sd = random_state_dict(expected_dalle_tensors(cfg), gen, logit_gain=2.0)
    for buffer in MASK_BUFFERS:  # the published files carry upstream's mask buffers
        sd[buffer] = build_mask(buffer.rsplit(".", 1)[1].removesuffix("_mask"), cfg)  # type: ignore[arg-type]
    torch.save(sd, root / block["checkpoint"])
    manifest_path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return root


def load_upstream_model(up: Upstream, cfg: DalleConfig, checkpoint: Path) -> tuple[torch.nn.Module, bool]:
    """Upstream's DalleModel as ``get_rudalle_model`` builds it, with the checkpoint's weights.

    Returns (model in eval mode, whether the file's mask buffers equal upstream's own masks).
    """
    model = up.dalle_model_cls(
        device="cpu", num_layers=cfg.num_layers, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads, embedding_dropout_prob=0.1,
        attention_dropout_prob=0.1, output_dropout_prob=0.1, text_seq_length=cfg.text_seq_length,
        image_tokens_per_dim=cfg.image_tokens_per_dim, image_vocab_size=cfg.image_vocab_size,
        cogview_sandwich_layernorm=cfg.cogview_sandwich_layernorm, cogview_pb_relax=cfg.cogview_pb_relax,
        hf_version=cfg.hf_version)
    sd = torch.load(checkpoint, map_location="cpu", weights_only=True)
    own = model.state_dict()
    masks_equal = all(torch.equal(sd[name].bool(), own[name].bool()) for name in MASK_BUFFERS)
    # Strict: every tensor of the file into every parameter; the mask buffers stay upstream's own.
    model.load_state_dict({**sd, **{name: own[name] for name in MASK_BUFFERS}}, strict=True)
    return model.eval(), masks_equal


# ----------------------------------------------------------------------------------- the two loops


def upstream_loop(up: Upstream, dalle: torch.nn.Module, input_ids: torch.Tensor, images: int, top_k: int,
                  top_p: float, temperature: float, seed: int, steps: int) -> tuple[torch.Tensor, float]:
    """One chunk of upstream's ``generate_images`` (no image prompts, use_cache=True), its loop body
    line for line, for the first ``steps`` image tokens. Returns (codes [images, steps], the seconds
    of its ppl forward when all 1024 tokens were sampled, else nan)."""
    torch.manual_seed(seed)  # upstream's utils.seed_everything: its multinomial uses the global generator
    vocab_size = dalle.get_param("vocab_size")
    text_seq_length = dalle.get_param("text_seq_length")
    total_seq_length = dalle.get_param("total_seq_length")
    device = dalle.get_param("device")
    chunk_bs = images
    with torch.no_grad():
        attention_mask = torch.tril(torch.ones((chunk_bs, 1, total_seq_length, total_seq_length),
                                               device=device))
        out = input_ids.unsqueeze(0).repeat(chunk_bs, 1).to(device)
        cache = None
        for _ in range(out.shape[1], min(total_seq_length, text_seq_length + steps)):  # tqdm(...) upstream
            logits, cache = dalle(out, attention_mask, use_cache=True, cache=cache, return_loss=False)
            logits = logits[:, -1, vocab_size:]
            logits /= temperature
            filtered_logits = up.top_k_top_p_filtering(logits, top_k=top_k, top_p=top_p)
            probs = torch.nn.functional.softmax(filtered_logits, dim=-1)
            sample = torch.multinomial(probs, 1)
            out = torch.cat((out, sample), dim=-1)
        ppl_s = float("nan")
        if out.shape[1] == total_seq_length:
            t0 = time.perf_counter()
            dalle(out, attention_mask, cache=None, use_cache=False, return_loss=False)  # ppl logits
            ppl_s = time.perf_counter() - t0
    return out[:, text_seq_length:], ppl_s


def ours_sampler(pipe: Pipeline, text_ids: torch.Tensor, images: int, top_k: int, top_p: float,
                 temperature: float, seed: int, steps: int) -> torch.Tensor:
    """Our decoder (the pipeline's) for ``images`` images; stops after ``steps`` steps if fewer than all."""
    decoder = pipe.decoder
    request = GenerationRequest(text_ids, images, SamplingParams(top_k, top_p, temperature), seed)
    if steps >= pipe.manifest.dalle.image_seq_length:
        (out,) = decoder.generate([request])
        return out.codes

    def stop(tick: Tick) -> None:
        if tick.steps >= steps:
            raise _Stop

    decoder.progress_every = 1  # instance attribute: only this benchmark's decoder
    try:
        decoder.generate([request], on_step=stop)
    except _Stop:
        pass
    finally:
        del decoder.progress_every
    return torch.empty(0)


def run_job(pipe: Pipeline, job: Job) -> Any:
    """``Pipeline.run`` for one job; its result (raises if the pipeline reports a failure instead)."""
    (outcome,) = pipe.run([job])
    if not hasattr(outcome, "timings"):
        raise RuntimeError(f"the request failed: {outcome!r}")
    return outcome


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


# ----------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4, help="images per request")
    ap.add_argument("--runs", type=int, default=3, help="timed runs of each side (medians reported)")
    ap.add_argument("--steps", type=int, default=1024,
                    help="decode steps (< 1024: a quick look at the sampler only, no whole request)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--query", default=DEFAULT_QUERY)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-dir", help="write (or reuse) the benchmark model directory here")
    ap.add_argument("--no-parity", action="store_true", help="skip the greedy parity check")
    ap.add_argument("--profile", nargs="?", const="cprofile", choices=("cprofile", "torch"),
                    help="profile one whole request of ours instead of benchmarking")
    ap.add_argument("--top", type=int, default=25, help="profile entries printed")
    ap.add_argument("--out", help="write the results as JSON here")
    return ap.parse_args(argv)


def profile_request(pipe: Pipeline, job: Job, kind: str, top: int) -> None:
    print(f"profiling one request ({job.params.images_to_gen} images, all steps) with {kind}", flush=True)
    if kind == "torch":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            result = run_job(pipe, job)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    else:
        prof = cProfile.Profile()
        prof.enable()
        result = run_job(pipe, job)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
        print(buf.getvalue())
    print(f"stage timings under the profiler: {result.timings}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    tmp = None
    if args.model_dir:
        model_dir = Path(args.model_dir)
        if not (model_dir / "model.json").is_file():
            write_model_dir(model_dir, args.layers, args.hidden, args.heads, args.seed)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-decode-")
        model_dir = write_model_dir(Path(tmp.name), args.layers, args.hidden, args.heads, args.seed)
    pipe = Pipeline.load(model_dir, device="cpu", dtype="fp32")
    cfg = pipe.manifest.dalle
    seq = cfg.image_seq_length
    steps = min(args.steps, seq)
    top_k, top_p, temperature = min(DEFAULT_TOP_K, cfg.image_vocab_size), DEFAULT_TOP_P, DEFAULT_TEMPERATURE
    text_ids = pipe.tokenizer.encode(args.query, cfg.text_seq_length)  # [text_seq_length]
    params = sum(p.numel() for p in pipe.dalle.parameters())
    print(f"model: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads, "
          f"vocab {cfg.vocab_size} + {cfg.image_vocab_size}, {params / 1e6:.1f}M params, fp32 CPU; "
          f"{args.batch} images, {steps} steps, top_k {top_k}, top_p {top_p}, temperature {temperature}; "
          f"torch {torch.__version__}, threads={threads}", flush=True)

    job = Job(args.query, GenerationParams(images_to_gen=args.batch, images_to_cherry_pick=args.batch,
                                           top_k=top_k, top_p=top_p, temperature=temperature,
                                           super_res=False, seed=args.seed))
    if args.profile:
        profile_request(pipe, job, args.profile, args.top)
        return 0

    up = load_upstream()
    up_model, masks_equal = load_upstream_model(up, cfg, pipe.manifest.dalle_checkpoint)
    print(f"upstream: {', '.join(PINS[:2])} from {up.model_file.parents[2]}; DalleModel loaded the "
          f"checkpoint strictly; its own mask buffers {'equal' if masks_equal else 'DIFFER FROM'} the file's",
          flush=True)

    result: dict[str, Any] = {
        "model": {"num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
                  "num_attention_heads": cfg.num_attention_heads, "vocab_size": cfg.vocab_size,
                  "image_vocab_size": cfg.image_vocab_size, "parameters": params, "dtype": "fp32"},
        "images": args.batch, "steps": steps, "runs": args.runs, "threads": threads,
        "sampling": {"top_k": top_k, "top_p": top_p, "temperature": temperature},
        "torch": torch.__version__, "upstream": list(PINS), "cpu": platform.processor() or platform.machine(),
        "upstream_masks_equal_file": masks_equal,
    }

    if not args.no_parity:
        greedy_up, _ = upstream_loop(up, up_model, text_ids, 1, 1, top_p, temperature, args.seed, steps)
        greedy_ours = ours_sampler(pipe, text_ids, 1, 1, top_p, temperature, args.seed, seq)[:, :steps]
        same = int((greedy_up == greedy_ours).sum())
        ok = same == steps
        distinct = int(greedy_ours.unique().numel())
        first = "" if ok else f", first difference at step {int((greedy_up != greedy_ours).nonzero()[0, 1])}"
        verdict = "PASS" if ok else "FAIL"
        print(f"check: greedy (top_k=1) codes, 1 image, {steps} steps ({distinct} distinct codes): "
              f"upstream == ours at {same}/{steps} positions -> {verdict}{first}", flush=True)
        result["greedy_parity"] = {"steps": steps, "equal_positions": same, "distinct_codes": distinct,
                                   "pass": ok}

    runs: dict[str, list[float]] = {"ours_sampler_s": [], "ours_request_s": [], "upstream_loop_s": [],
                                    "upstream_ppl_forward_s": []}
    stages: list[dict[str, float]] = []
    for r in range(args.runs):
        t, _ = timed(lambda: ours_sampler(pipe, text_ids, args.batch, top_k, top_p, temperature,
                                          args.seed, steps))
        runs["ours_sampler_s"].append(t)
        line = f"run {r + 1}/{args.runs}: ours sampler {t:.2f} s"
        if steps == seq:
            t, res = timed(lambda: run_job(pipe, job))
            runs["ours_request_s"].append(t)
            stages.append(res.timings)
            line += f", ours request {t:.2f} s {res.timings}"
        t, (_, ppl_s) = timed(lambda: upstream_loop(up, up_model, text_ids, args.batch, top_k, top_p,
                                                    temperature, args.seed, steps))
        runs["upstream_loop_s"].append(t - (0.0 if ppl_s != ppl_s else ppl_s))  # the loop alone
        if ppl_s == ppl_s:
            runs["upstream_ppl_forward_s"].append(ppl_s)
        print(line + f", upstream loop {runs['upstream_loop_s'][-1]:.2f} s", flush=True)

    if args.runs > 0:
        report(result, runs, stages, args.runs, args.batch, steps, threads)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    if tmp is not None:
        tmp.cleanup()
    return 0 if result.get("greedy_parity", {}).get("pass", True) else 1


def report(result: dict[str, Any], runs: dict[str, list[float]], stages: list[dict[str, float]], n_runs: int,
           images: int, steps: int, threads: int) -> None:
    """Print the medians and ratios and add them to ``result``."""
    med = {k: statistics.median(v) for k, v in runs.items() if v}
    result["runs_s"] = runs
    result["median_s"] = med
    up_s, ours_s = med["upstream_loop_s"], med["ours_sampler_s"]
    print(f"\nmedians of {n_runs} runs, {images} images x {steps} steps, {threads} threads:")
    print(f"  upstream loop     {up_s:8.2f} s  {1000 * up_s / steps:8.2f} ms/step")
    print(f"  ours, sampler     {ours_s:8.2f} s  {1000 * ours_s / steps:8.2f} ms/step  "
          f"-> {up_s / ours_s:.2f}x faster than upstream's loop")
    result["ms_per_step"] = {"upstream_loop": 1000 * up_s / steps, "ours_sampler": 1000 * ours_s / steps}
    result["speedup"] = {"sampler_vs_upstream_loop": up_s / ours_s}
    if "ours_request_s" in med:
        req_s = med["ours_request_s"]
        stage_med = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
        print(f"  ours, request     {req_s:8.2f} s  {1000 * req_s / steps:8.2f} ms/step  "
              f"-> {up_s / req_s:.2f}x faster than upstream's loop alone "
              f"(stages: {', '.join(f'{k} {v:.2f} s' for k, v in stage_med.items())})")
        result["ms_per_step"]["ours_request"] = 1000 * req_s / steps
        result["speedup"]["request_vs_upstream_loop"] = up_s / req_s
        result["ours_request_stages_median_s"] = stage_med
    if "upstream_ppl_forward_s" in med:
        print(f"  (upstream's generate_images then runs one uncached ppl forward: "
              f"{med['upstream_ppl_forward_s']:.2f} s, not counted above)")


if __name__ == "__main__":
    sys.exit(main())
