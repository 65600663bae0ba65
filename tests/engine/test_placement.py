"""Placement plans for Kandinsky's real shape on stated GPU memory sizes (meta device, no GPU needed),
device parsing, KV-cache arithmetic, and split-vs-unsplit equivalence of the tiny model on the CPU."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

from app.engine import placement, store
from app.engine.nets.dalle import (
    DALLE_PRESETS,
    MASK_BUFFERS,
    DalleConfig,
    DalleModel,
    build_mask,
    layer_mask_kind,
)
from app.engine.nets.decoding import GenerationRequest, ImageTokenDecoder, SamplingParams
from app.engine.placement import (
    DeviceSpec,
    PlacementError,
    kv_cache_bytes,
    parse_devices,
    plan_placement,
    probe_devices,
)
from bench.gpu_decode import bandwidth_for, bound_fraction

GiB = 2**30
KANDINSKY = DALLE_PRESETS["kandinsky"]
FP16 = torch.float16
# What the CUDA context takes before we measure free memory.
CONTEXT_GIB = 0.5


def gpus(count: int, total_gib: float) -> list[DeviceSpec]:
    return [
        DeviceSpec(f"cuda:{i}", int(total_gib * GiB), int((total_gib - CONTEXT_GIB) * GiB))
        for i in range(count)
    ]


V100_X3 = gpus(3, 32)
A100_40 = gpus(1, 40)
A100_80 = gpus(1, 80)
H100_80 = gpus(1, 80)


def meta_weight_bytes(cfg: DalleConfig, dtype: torch.dtype) -> int:
    with torch.device("meta"):
        model = DalleModel(cfg)
    return sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8


def assert_within_memory(plan: placement.PlacementPlan, devices: list[DeviceSpec], batch: int) -> None:
    for d in devices:
        assert plan.bytes_needed(d.name, batch) <= d.free_bytes - plan.reserve_bytes, d.name


# ---------------------------------------------------------------------------------------- parse_devices


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("cpu", ["cpu"]),
        ("cuda:0", ["cuda:0"]),
        ("cuda", ["cuda:0"]),
        ("cuda:0,cuda:1,cuda:2", ["cuda:0", "cuda:1", "cuda:2"]),
        (" cuda:2, cuda:0 ", ["cuda:2", "cuda:0"]),
    ],
)
def test_parse_devices_accepts_cpu_and_cuda_lists(spec: str, expected: list[str]) -> None:
    assert parse_devices(spec) == expected


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("cuda:x", "'cuda:x'"),
        ("tpu", "'tpu'"),
        ("cuda:0,tpu:1", "'tpu:1'"),
        ("cuda:0,cuda:0", "'cuda:0' is listed twice"),
        ("cpu,cuda:0", "mixes 'cpu'"),
        ("cuda:0,", "''"),
        ("", "device must be"),
        ("cuda:-1", "'cuda:-1'"),
    ],
)
def test_parse_devices_rejects_bad_parts_by_name(spec: str, named: str) -> None:
    with pytest.raises(ValueError, match=re.escape(named)):
        parse_devices(spec)


def test_parse_devices_auto_is_every_cuda_device_or_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parse_devices("auto") == ["cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert parse_devices("AUTO") == ["cuda:0", "cuda:1", "cuda:2"]


def test_probe_devices_reads_host_memory_for_cpu() -> None:
    (spec,) = probe_devices(["cpu"])
    assert spec.name == "cpu"
    assert 0 < spec.free_bytes <= spec.total_bytes


def test_probe_devices_rejects_a_missing_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"'cuda:1' is not available"):
        probe_devices(["cuda:1"])


def test_plan_on_this_host_cpu_keeps_the_tiny_model_in_one_stage() -> None:
    cfg = DalleConfig(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=384,
                      image_vocab_size=64)
    plan = plan_placement(cfg, probe_devices(["cpu"]), torch.float32)
    assert plan.stages == [("cpu", 0, 3)] and set(plan.device_map.values()) == {"cpu"}
    assert plan.batch_limit == placement.DEFAULT_BATCH_CAP  # a few MB per image: the cap binds
    assert plan.reserve_bytes == placement.CPU_RESERVE_BYTES


# ------------------------------------------------------------------------------------- KV-cache bytes


def test_kv_cache_full_is_k_and_v_of_every_position_of_every_layer() -> None:
    cfg = KANDINSKY
    # K and V, batch 3, fp16 (2 bytes)
    per_layer = 2 * 3 * cfg.num_attention_heads * cfg.total_seq_length * cfg.head_dim * 2
    assert kv_cache_bytes(cfg, 3, FP16, windowed=False) == cfg.num_layers * per_layer


def test_kv_cache_windowed_keeps_text_plus_33_positions_in_row_layers_only() -> None:
    cfg = KANDINSKY
    kinds = [layer_mask_kind(i, cfg.num_layers) for i in range(cfg.num_layers)]
    assert (kinds.count("row"), kinds.count("col"), kinds.count("conv")) == (47, 16, 1)
    position_bytes = 2 * cfg.hidden_size * 2  # K and V of one position, one image, fp16
    saved = kinds.count("row") * (cfg.total_seq_length - (cfg.n_text + 33)) * position_bytes
    full = kv_cache_bytes(cfg, 1, FP16, windowed=False)
    assert kv_cache_bytes(cfg, 1, FP16, windowed=True) == full - saved
    assert kv_cache_bytes(cfg, 5, torch.float32) == 2 * 5 * kv_cache_bytes(cfg, 1, FP16)


# -------------------------------------------------------------------- Kandinsky plans on stated GPUs


@pytest.fixture(scope="module")
def plans() -> dict[str, placement.PlacementPlan]:
    """The memory-derived plans, computed once: planning Kandinsky takes a fraction of a second each."""
    return {
        "v100x3": plan_placement(KANDINSKY, V100_X3, FP16),
        "v100x3-full": plan_placement(KANDINSKY, V100_X3, FP16, windowed=False),
        "a100-40": plan_placement(KANDINSKY, A100_40, FP16),
        "a100-40-full": plan_placement(KANDINSKY, A100_40, FP16, windowed=False),
        "a100-80": plan_placement(KANDINSKY, A100_80, FP16),
        "a100-80-full": plan_placement(KANDINSKY, A100_80, FP16, windowed=False),
        "h100-80-bf16": plan_placement(KANDINSKY, H100_80, torch.bfloat16),
    }


def test_plan_on_one_a100_40gb_keeps_everything_on_cuda0_with_the_largest_batch_that_fits(plans) -> None:
    plan = plans["a100-40"]
    assert plan.stages == [("cuda:0", 0, KANDINSKY.num_layers - 1)]
    assert set(plan.device_map.values()) == {"cuda:0"}
    assert plan.main_device == "cuda:0"
    assert plan.weight_bytes["cuda:0"] == meta_weight_bytes(KANDINSKY, FP16)
    assert 1 <= plan.batch_limit < placement.DEFAULT_BATCH_CAP
    assert_within_memory(plan, A100_40, plan.batch_limit)
    # One more image would not fit: the limit is the largest batch, not a safe guess.
    free = A100_40[0].free_bytes - plan.reserve_bytes
    assert plan.bytes_needed("cuda:0", plan.batch_limit + 1) > free


def test_more_memory_and_the_windowed_cache_give_larger_batch_limits(plans) -> None:
    limits = {name: p.batch_limit for name, p in plans.items()}
    assert limits["a100-80"] > limits["a100-40"]
    assert limits["a100-80-full"] > limits["a100-40-full"]
    assert limits["a100-40"] > limits["a100-40-full"]
    assert limits["a100-80"] >= limits["a100-80-full"]
    assert limits["v100x3"] >= limits["v100x3-full"]
    assert all(1 <= n <= placement.DEFAULT_BATCH_CAP for n in limits.values())


def test_plan_on_three_v100_splits_layers_into_three_even_contiguous_stages(plans) -> None:
    for name in ("v100x3", "v100x3-full"):
        plan = plans[name]
        devices = [d for d, _, _ in plan.stages]
        assert devices == ["cuda:0", "cuda:1", "cuda:2"]
        # Contiguous and complete: each stage starts where the previous one ended.
        assert plan.stages[0][1] == 0 and plan.stages[-1][2] == KANDINSKY.num_layers - 1
        for (_, _, last), (_, first, _) in zip(plan.stages, plan.stages[1:]):
            assert first == last + 1
        counts = [last - first + 1 for _, first, last in plan.stages]
        assert all(abs(c - KANDINSKY.num_layers / 3) <= 4 for c in counts), counts
        for i in range(KANDINSKY.num_layers):
            stage = next(d for d, a, b in plan.stages if a <= i <= b)
            assert plan.device_map[f"transformer.layers.{i}"] == stage
        # Embeddings on the first device, the head with the other networks on the main device.
        assert plan.device_map["text_embeddings"] == "cuda:0"
        assert plan.device_map["image_embeddings"] == "cuda:0"
        assert plan.device_map["to_logits"] == plan.main_device == "cuda:0"
        assert plan.device_map["transformer.final_layernorm"] == "cuda:0"
        assert plan.fixed_bytes == {"cuda:0": placement.DEFAULT_OTHER_NETS_BYTES, "cuda:1": 0, "cuda:2": 0}
        assert sum(plan.weight_bytes.values()) == meta_weight_bytes(KANDINSKY, FP16)
        assert_within_memory(plan, V100_X3, plan.batch_limit)


def test_plan_on_h100_in_bf16_fits_on_one_device(plans) -> None:
    plan = plans["h100-80-bf16"]
    assert plan.stages == [("cuda:0", 0, 63)]
    assert plan.batch_limit == plans["a100-80"].batch_limit  # same memory, same element size
    assert_within_memory(plan, H100_80, plan.batch_limit)


def test_device_map_places_every_checkpoint_tensor(plans) -> None:
    plan = plans["v100x3"]
    for name in store.expected_dalle_tensors(KANDINSKY):
        # Exactly one key covers each tensor (no reliance on the loader's CPU default), and the
        # loader resolves it to that key's device.
        keys = [k for k in plan.device_map if name.startswith(k + ".")]
        assert len(keys) == 1, (name, keys)
        assert str(store.device_for(name, plan.device_map)) == plan.device_map[keys[0]]
    assert not any(k.startswith("transformer.layers.") and k.count(".") != 2 for k in plan.device_map)


def test_describe_is_json_and_names_stages_and_memory(plans) -> None:
    card = json.loads(json.dumps(plans["v100x3"].describe()))
    assert card["batch_limit"] == plans["v100x3"].batch_limit
    assert [s["device"] for s in card["stages"]] == ["cuda:0", "cuda:1", "cuda:2"]
    assert sum(s["num_layers"] for s in card["stages"]) == 64
    assert card["head_device"] == "cuda:0" and card["kv_cache"] == "windowed"
    assert set(card["memory_gib"]) == {"cuda:0", "cuda:1", "cuda:2"}


def test_a_requested_batch_that_fits_is_the_batch_limit() -> None:
    plan = plan_placement(KANDINSKY, A100_40, FP16, 8)
    assert plan.batch_limit == 8
    assert_within_memory(plan, A100_40, 8)


def test_a_requested_batch_that_does_not_fit_says_how_many_would(plans) -> None:
    most = plans["a100-40-full"].batch_limit
    expected = rf"max_batch_images={most + 1} does not fit.*at most {most} images"
    with pytest.raises(PlacementError, match=expected):
        plan_placement(KANDINSKY, A100_40, FP16, most + 1, windowed=False)


def test_too_little_memory_raises_saying_how_much_is_missing() -> None:
    small = gpus(1, 16)
    with pytest.raises(PlacementError) as err:
        plan_placement(KANDINSKY, small, FP16)
    message = str(err.value)
    assert "cuda:0" in message
    missing = float(re.search(r"([\d.]+) GiB missing", message).group(1))  # type: ignore[union-attr]
    need = (
        meta_weight_bytes(KANDINSKY, FP16)
        + kv_cache_bytes(KANDINSKY, 1, FP16)
        + placement.layer_activation_bytes(KANDINSKY, FP16)
        + placement.head_activation_bytes(KANDINSKY, FP16)
        + placement.DEFAULT_OTHER_NETS_BYTES
    )
    have = small[0].free_bytes - placement.DEFAULT_RESERVE_BYTES
    assert missing == pytest.approx((need - have) / GiB, abs=0.01)


def test_two_gpus_too_small_together_report_the_missing_total() -> None:
    with pytest.raises(PlacementError, match=r"GiB missing"):
        plan_placement(KANDINSKY, gpus(2, 12), FP16)


def test_main_device_without_room_for_the_other_networks_is_refused() -> None:
    devices = [DeviceSpec("cuda:0", 4 * GiB, 3 * GiB), *gpus(3, 32)[1:]]
    with pytest.raises(PlacementError, match=r"GiB missing"):
        plan_placement(KANDINSKY, devices, FP16)


# ------------------------------------------------------------ split vs unsplit on the CPU (tiny models)

# A short 6x6 grid keeps generation to 36 steps; 6 layers make three two-layer stages.
SMALL = DalleConfig(num_layers=6, hidden_size=32, num_attention_heads=4, text_seq_length=8,
                    image_tokens_per_dim=6, vocab_size=64, image_vocab_size=48)


def three_stage_map(cfg: DalleConfig) -> dict[str, str]:
    """A plan for three stand-in GPUs, each with room for about a third of the layers, moved to the CPU.

    The CPU is the only device here, so the stages all land on "cpu"; what is exercised is that the
    plan's device map is what the loader and the decoder consume, stage by stage.
    """
    batch = 2
    need = (
        meta_weight_bytes(cfg, torch.float32)
        + kv_cache_bytes(cfg, batch, torch.float32)
        + 3 * batch * placement.layer_activation_bytes(cfg, torch.float32)
        + batch * placement.head_activation_bytes(cfg, torch.float32)
    )
    per_device = int(need * 0.6)
    devices = [DeviceSpec(f"cuda:{i}", per_device, per_device) for i in range(3)]
    plan = plan_placement(cfg, devices, torch.float32, batch, reserve_bytes=0, other_nets_bytes=0)
    assert [d for d, _, _ in plan.stages] == ["cuda:0", "cuda:1", "cuda:2"], plan.stages
    return {name: "cpu" for name in plan.device_map}


def write_checkpoint(cfg: DalleConfig, path: Path, seed: int) -> None:
    """A seeded random state dict in the published format (mask buffers included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in DalleModel(cfg).state_dict().items()}
    sd: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=gen) * 0.3
        sd[name] = 1.0 + noise if name.endswith("weight") and len(shape) == 1 else noise
    for buffer in MASK_BUFFERS:
        sd[buffer] = build_mask(buffer.rsplit(".", 1)[1].removesuffix("_mask"), cfg)  # type: ignore[arg-type]
    torch.save(sd, path)


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> store.Manifest:
    tiny = store.load_manifest(tiny_model_dir)
    ckpt = tmp_path_factory.mktemp("small") / "dalle.bin"
    write_checkpoint(SMALL, ckpt, seed=3)
    return dataclasses.replace(tiny, dalle=SMALL, dalle_checkpoint=ckpt)


def test_split_model_forward_matches_the_unsplit_model(tiny_model_dir: Path) -> None:
    manifest = store.load_manifest(tiny_model_dir)
    cfg = manifest.dalle
    whole = store.load_dalle(manifest, None, torch.float32)
    split = store.load_dalle(manifest, three_stage_map(cfg), torch.float32)
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(4, cfg.vocab_size - cfg.text_seq_length, (2, cfg.text_seq_length), generator=gen)
    image = torch.randint(0, cfg.image_vocab_size, (2, 100), generator=gen)
    ids = torch.cat((text, image), dim=1)  # [2, 228]
    with torch.inference_mode():
        expected, got = whole(ids), split(ids)
    assert got.shape == (2, 228, cfg.total_vocab_size)
    assert torch.equal(got, expected)


def test_split_model_generates_the_same_codes_with_one_or_three_microbatches(
    small_manifest: store.Manifest,
) -> None:
    whole = store.load_dalle(small_manifest, None, torch.float32)
    split = store.load_dalle(small_manifest, three_stage_map(SMALL), torch.float32)
    ids = torch.zeros(SMALL.text_seq_length, dtype=torch.long)
    ids[:4] = torch.tensor([2, 17, 9, 3])
    requests = [
        GenerationRequest(ids, 3, SamplingParams(top_k=48, top_p=1.0, temperature=1.0), seed=11),
        GenerationRequest(ids, 2, SamplingParams(top_k=8, top_p=0.9, temperature=0.7), seed=12),
    ]
    reference = ImageTokenDecoder(whole, 5, microbatches=1).generate(requests)
    staged = ImageTokenDecoder(split, 5, microbatches=3).generate(requests)
    for ref, out in zip(reference, staged):
        assert torch.equal(out.codes, ref.codes)
        # Micro-batches change matmul shapes, so float sums may round differently: close, not equal.
        torch.testing.assert_close(out.ppl, ref.ppl, rtol=1e-5, atol=0)
    assert reference[0].codes.shape == (3, SMALL.image_seq_length)


# ----------------------------------------------------------------------- bench/gpu_decode.py arithmetic


def test_bytes_read_per_step_counts_layer_weights_head_and_the_visible_cache() -> None:
    cfg = KANDINSKY
    with torch.device("meta"):
        model = DalleModel(cfg)
    weights = sum(p.numel() for p in model.transformer.layers.parameters())
    weights += sum(p.numel() for p in model.transformer.final_layernorm.parameters())
    weights += sum(p.numel() for p in model.to_logits[0].parameters())
    weights += cfg.image_vocab_size * (cfg.hidden_size + 1)  # image rows of to_logits[1] and their bias
    step0 = placement.bytes_read_per_step(cfg, FP16, 1, 0)
    position = 2 * cfg.hidden_size * 2  # K and V of one position, fp16
    assert step0 == 2 * weights + cfg.num_layers * cfg.n_text * position
    # Late in the image the row layers stop growing (window) while column and conv layers keep reading.
    last = placement.bytes_read_per_step(cfg, FP16, 8, cfg.image_seq_length - 1)
    full = placement.bytes_read_per_step(cfg, FP16, 8, cfg.image_seq_length - 1, windowed=False)
    assert full - last == 8 * 47 * (cfg.total_seq_length - 1 - (cfg.n_text + 33)) * position
    mean = placement.mean_bytes_read_per_step(cfg, FP16, 8)
    assert placement.bytes_read_per_step(cfg, FP16, 8, 0) < mean < last


def test_bandwidth_table_and_bound_fraction() -> None:
    assert bandwidth_for("NVIDIA H100 80GB HBM3") == 3350
    assert bandwidth_for("NVIDIA H100 PCIe") == 2000
    assert bandwidth_for("NVIDIA H200") == 4800
    assert bandwidth_for("NVIDIA A100-SXM4-80GB") == 2039
    assert bandwidth_for("NVIDIA A100-SXM4-40GB") == 1555
    assert bandwidth_for("Tesla V100-SXM2-32GB") == 900
    assert bandwidth_for("Some Future GPU") is None
    # 2 GB per step at 2000 GB/s takes 1 ms; taking 2 ms reaches half the bound.
    assert bound_fraction(2e9, 2.0, 2000) == pytest.approx(0.5)
    assert math.isnan(bound_fraction(2e9, 2.0, None))
