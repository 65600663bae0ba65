"""Where the ruDALL-E transformer's layers go, and how many images one generation batch may hold.

The plan is computed on the meta device, so it needs no GPU: accelerate's ``infer_auto_device_map``
splits ``transformer.layers`` into contiguous stages, one per device, with each layer's size counted
as its weights plus its KV cache for the planned batch. Embeddings go on the first device; the output
head (``transformer.final_layernorm``, ``to_logits``) and the other networks (VQ-GAN, ruCLIP,
RealESRGAN, reserved as ``other_nets_bytes``) on the main device, which is the first device. Hidden
states therefore cross devices only at stage boundaries (and once back to the head).

Memory model, per device (all in bytes)::

    weights + batch * (kv cache per image + activations per image) + fixed  <=  free - reserve

where ``fixed`` is the other networks on the main device. The batch limit is the largest batch for
which such a placement exists, capped at ``DEFAULT_BATCH_CAP``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import compute_module_sizes, infer_auto_device_map

from app.engine.nets.dalle import DalleConfig, DalleLayer, DalleModel, layer_mask_kind, row_window

log = logging.getLogger(__name__)

GiB = 2**30
# Left free on every device: allocator fragmentation, cuBLAS/cuDNN workspaces, compiled-graph pools.
DEFAULT_RESERVE_BYTES = 1 * GiB
# The other three networks on the main device, weights and working memory. Weights: ruCLIP
# ViT-L/14-336 ~430M params in fp32 1.7 GB, VQ-GAN decoder 40M params 0.16 GB, RealESRGAN x4 17M
# params 0.07 GB; working memory: VQ-GAN decoding a few 256x256 images (~150 MB each in fp32) and
# RealESRGAN on a batch of 4 tiles (~1 GB). The pipeline may pass a measured value instead.
DEFAULT_OTHER_NETS_BYTES = 4 * GiB
# On the CPU (development and tests, often tiny models on small machines) only a token reserve: an
# optimistic plan there costs swap, not a crash, and the GPU defaults would refuse small hosts.
CPU_RESERVE_BYTES = 256 * 2**20
CPU_OTHER_NETS_BYTES = 256 * 2**20
# A sane ceiling on the memory-derived batch: beyond it a step's latency grows for little throughput.
DEFAULT_BATCH_CAP = 64
# Bytes per image-vocabulary entry while sampling one token: fp32 logits, probabilities, sorted values
# and cumulative sums (4 x 4 bytes) plus int64 sort indices (8 bytes).
SAMPLING_BYTES_PER_VOCAB_ENTRY = 24

ACCELERATE_LOGGER = "accelerate.utils.modeling"
EMBEDDING_MODULES = (
    "text_embeddings",
    "image_embeddings",
    "text_pos_embeddings",
    "image_row_embeddings",
    "image_col_embeddings",
)
HEAD_MODULES = ("transformer.final_layernorm", "to_logits")
LAYER_PREFIX = "transformer.layers."


class PlacementError(ValueError):
    """The model does not fit the given devices (the message says how much memory is missing)."""


@dataclass(frozen=True)
class DeviceSpec:
    """One device and its memory as seen at start-up."""

    name: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class PlacementPlan:
    """Where every module lives and how many images a generation batch may hold.

    ``device_map`` is accelerate style (module prefix -> device name) with explicit keys for the
    embeddings, every ``transformer.layers.N``, ``transformer.final_layernorm`` and ``to_logits``.
    ``stages`` lists ``(device, first_layer, last_layer)`` (inclusive) in execution order. The byte
    dicts are keyed by device name.
    """

    device_map: dict[str, str]
    main_device: str
    stages: list[tuple[str, int, int]]
    batch_limit: int
    dtype: torch.dtype
    windowed: bool
    weight_bytes: dict[str, int]
    kv_bytes_per_image: dict[str, int]
    activation_bytes_per_image: dict[str, int]
    fixed_bytes: dict[str, int]
    free_bytes: dict[str, int]
    reserve_bytes: int
    devices: list[str]

    def bytes_needed(self, device: str, batch: int) -> int:
        """What ``device`` holds for a batch of ``batch`` images, reserve excluded."""
        per_image = self.kv_bytes_per_image[device] + self.activation_bytes_per_image[device]
        return self.weight_bytes[device] + self.fixed_bytes[device] + batch * per_image

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary for the start-up log and the model card."""
        return {
            "main_device": self.main_device,
            "dtype": str(self.dtype).removeprefix("torch."),
            "kv_cache": "windowed" if self.windowed else "full",
            "batch_limit": self.batch_limit,
            "stages": [
                {"device": d, "layers": [first, last], "num_layers": last - first + 1}
                for d, first, last in self.stages
            ],
            "embeddings_device": self.device_map[EMBEDDING_MODULES[0]],
            "head_device": self.device_map["to_logits"],
            "memory_gib": {
                d: {
                    "free": _gib(self.free_bytes[d]),
                    "weights": _gib(self.weight_bytes[d]),
                    "other_nets": _gib(self.fixed_bytes[d]),
                    "kv_cache_per_image": _gib(self.kv_bytes_per_image[d]),
                    "activations_per_image": _gib(self.activation_bytes_per_image[d]),
                    "at_batch_limit": _gib(self.bytes_needed(d, self.batch_limit)),
                    "reserve": _gib(self.reserve_bytes),
                }
                for d in self.devices
            },
        }


def _gib(n: int) -> float:
    return round(n / GiB, 3)


def _amount(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB // 10 else f"{n / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------------------- devices


def parse_devices(spec: str) -> list[str]:
    """``"auto"`` (every CUDA device, else the CPU), ``"cpu"``, or a list such as ``"cuda:0,cuda:1"``.

    Raises ValueError naming the bad part: an unknown device, a bad index, a duplicate, or CPU mixed
    with CUDA devices.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"device must be 'auto', 'cpu' or a list like 'cuda:0,cuda:1', got {spec!r}")
    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return ["cpu"]
    names: list[str] = []
    for raw in spec.split(","):
        part = raw.strip()
        if part == "cpu":
            name = "cpu"
        elif part == "cuda":
            name = "cuda:0"
        elif part.startswith("cuda:") and part[5:].isdigit() and part[5:].isascii():
            name = f"cuda:{int(part[5:])}"
        else:
            raise ValueError(
                f"device {part!r} in {spec!r} is not 'cpu' or 'cuda:N' (N a device index)"
            )
        if name in names:
            raise ValueError(f"device {part!r} is listed twice in {spec!r}")
        names.append(name)
    if "cpu" in names and len(names) > 1:
        raise ValueError(f"device list {spec!r} mixes 'cpu' with CUDA devices; use one or the other")
    return names


def probe_devices(names: Sequence[str]) -> list[DeviceSpec]:
    """Total and free memory of each named device (CUDA: ``mem_get_info``; CPU: /proc/meminfo)."""
    specs = []
    for name in names:
        dev = torch.device(name)
        if dev.type == "cuda":
            if not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count():
                raise ValueError(
                    f"device {name!r} is not available ({torch.cuda.device_count()} CUDA devices visible)"
                )
            free, total = torch.cuda.mem_get_info(dev)
            specs.append(DeviceSpec(name, int(total), int(free)))
        elif dev.type == "cpu":
            total, free = _host_memory()
            specs.append(DeviceSpec(name, total, free))
        else:
            raise ValueError(f"device {name!r}: only 'cpu' and 'cuda:N' are supported")
    return specs


def _host_memory() -> tuple[int, int]:
    """(total, available) host memory in bytes."""
    try:
        fields_kb: dict[str, int] = {}
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                fields_kb[key] = int(rest.split()[0])
        return fields_kb["MemTotal"] * 1024, fields_kb["MemAvailable"] * 1024
    except (OSError, KeyError, ValueError, IndexError):
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page


# ------------------------------------------------------------------------------- memory arithmetic


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def kv_positions(cfg: DalleConfig, layer: int, windowed: bool = True) -> int:
    """Sequence positions layer ``layer`` keeps in its KV cache.

    A row-mask query sees the text and the last ``row_window`` image keys, so a windowed cache keeps
    ``n_text + row_window`` positions there; column and conv layers (and every layer unwindowed) keep
    the whole sequence.
    """
    full = cfg.total_seq_length
    if windowed and layer_mask_kind(layer, cfg.num_layers) == "row":
        return min(full, cfg.n_text + row_window(cfg))
    return full


def kv_layer_bytes(
    cfg: DalleConfig, layer: int, batch: int, dtype: torch.dtype, windowed: bool = True
) -> int:
    """K and V of one layer, each [batch, heads, positions, head_dim]."""
    per_position = 2 * cfg.num_attention_heads * cfg.head_dim * _dtype_bytes(dtype)
    return batch * kv_positions(cfg, layer, windowed) * per_position


def kv_cache_bytes(cfg: DalleConfig, batch: int, dtype: torch.dtype, windowed: bool = True) -> int:
    """The KV cache of every layer for ``batch`` images."""
    return sum(kv_layer_bytes(cfg, i, batch, dtype, windowed) for i in range(cfg.num_layers))


def layer_activation_bytes(cfg: DalleConfig, dtype: torch.dtype) -> int:
    """Working memory per image on a device running layers: the larger of one decode step and prefill.

    Per token: residual, layernorm output, q/k/v (3), attention context and dense output (7h), the
    MLP's 4h input and output plus two GELU temporaries (16h); plus fp32 attention scores over every
    key. Prefill runs the ``n_text`` text positions at once, with [n_text, n_text] scores per head.
    """
    h, heads, size = cfg.hidden_size, cfg.num_attention_heads, _dtype_bytes(dtype)
    per_token = 23 * h * size
    step = per_token + 4 * heads * cfg.total_seq_length
    prefill = cfg.n_text * per_token + 4 * heads * cfg.n_text * cfg.n_text
    return max(step, prefill)


def head_activation_bytes(cfg: DalleConfig, dtype: torch.dtype) -> int:
    """Working memory per image on the main device for one token: logits [total_vocab] in ``dtype``
    and the fp32 sampling temporaries over the image vocabulary."""
    return (
        cfg.total_vocab_size * _dtype_bytes(dtype)
        + cfg.image_vocab_size * SAMPLING_BYTES_PER_VOCAB_ENTRY
    )


# ----------------------------------------------------------------------------------------- planning


@contextmanager
def _quiet_accelerate() -> Iterator[None]:
    """Silence accelerate's warnings about planning only: cuda:N 'is not available' when planning for
    GPUs this host lacks, and offloaded buffers when a trial batch does not fit (we never offload)."""

    def drop_unavailable(record: logging.LogRecord) -> bool:
        return "is not available" not in record.getMessage()

    logger = logging.getLogger(ACCELERATE_LOGGER)
    logger.addFilter(drop_unavailable)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        logger.removeFilter(drop_unavailable)


def _accelerate_key(name: str) -> int | str:
    dev = torch.device(name)
    return dev.index or 0 if dev.type == "cuda" else dev.type


@dataclass
class _Attempt:
    layer_devices: list[str] | None  # None: no contiguous split fits
    shortfall: int  # bytes missing on the worst device (0 when it fits)


class _Planner:
    """The per-layer sizes of one config and dtype, and contiguous splits for a given batch."""

    def __init__(
        self,
        cfg: DalleConfig,
        devices: Sequence[DeviceSpec],
        dtype: torch.dtype,
        windowed: bool,
        reserve_bytes: int,
        other_nets_bytes: int,
    ) -> None:
        self.cfg, self.devices, self.dtype, self.windowed = cfg, list(devices), dtype, windowed
        self.names = [d.name for d in devices]
        self.main, self.first = self.names[0], self.names[0]
        with torch.device("meta"):
            self.model = DalleModel(cfg)
        sizes = compute_module_sizes(self.model, dtype=dtype)
        self.layer_weights = [sizes[f"{LAYER_PREFIX}{i}"] for i in range(cfg.num_layers)]
        self.kv_per_image = [kv_layer_bytes(cfg, i, 1, dtype, windowed) for i in range(cfg.num_layers)]
        self.embedding_weights = sum(sizes[m] for m in EMBEDDING_MODULES)
        self.head_weights = sum(sizes[m] for m in HEAD_MODULES)
        self.layer_act = layer_activation_bytes(cfg, dtype)
        self.head_act = head_activation_bytes(cfg, dtype)
        self.reserve = reserve_bytes
        self.other_nets = other_nets_bytes

    # What each device must hold besides its layers, and what is left for layers at a batch size.
    def fixed_weights(self, name: str) -> int:
        return (self.embedding_weights if name == self.first else 0) + (
            self.head_weights if name == self.main else 0
        )

    def fixed_other(self, name: str) -> int:
        return self.other_nets if name == self.main else 0

    def per_image_act(self, name: str) -> int:
        return self.layer_act + (self.head_act if name == self.main else 0)

    def layer_budget(self, spec: DeviceSpec, batch: int) -> int:
        return (
            spec.free_bytes
            - self.reserve
            - self.fixed_weights(spec.name)
            - self.fixed_other(spec.name)
            - batch * self.per_image_act(spec.name)
        )

    def layer_costs(self, batch: int) -> list[int]:
        return [w + batch * kv for w, kv in zip(self.layer_weights, self.kv_per_image)]

    def split(self, batch: int) -> _Attempt:
        """A contiguous split of the layers for ``batch`` images, balanced by free memory if it fits."""
        costs = self.layer_costs(batch)
        budgets = [self.layer_budget(spec, batch) for spec in self.devices]
        total, room = sum(costs), sum(max(b, 0) for b in budgets)
        # A negative budget on the main device means its fixed part alone does not fit; elsewhere it
        # only means that device takes no layers.
        shortfall = max(total - room, 0) + max(-budgets[0], 0)
        if shortfall:
            return _Attempt(None, shortfall)
        budgets = [max(b, 0) for b in budgets]
        # Balanced: each device gets a share of the layers proportional to its room, rounded to the
        # nearest layer; the last device takes whatever is left. Greedy (fill in order) is the fallback
        # for when rounding leaves the last device short.
        share = [b * total / room for b in budgets]
        mean_cost = total / len(costs)
        balanced = [min(b, int(s + mean_cost / 2)) for b, s in zip(budgets, share)]
        balanced[-1] = budgets[-1]
        for limits in (balanced, budgets):
            layer_devices = self._infer(costs, limits)
            if layer_devices is not None and self._within(costs, budgets, layer_devices):
                return _Attempt(layer_devices, 0)
        return _Attempt(None, max(costs))

    def _within(self, costs: list[int], budgets: list[int], layer_devices: list[str]) -> bool:
        """Check accelerate's answer against our own budgets (its offload reserve is approximated)."""
        used = dict.fromkeys(self.names, 0)
        for d, cost in zip(layer_devices, costs):
            used[d] += cost
        return all(used[n] <= b for n, b in zip(self.names, budgets))

    def _infer(self, costs: list[int], limits: list[int]) -> list[str] | None:
        layers = self.model.transformer.layers
        for layer, cost, weight in zip(layers, costs, self.layer_weights):
            # A uint8 meta buffer makes accelerate count each layer as weights + its KV cache.
            layer.register_buffer(
                "planned_kv_cache", torch.empty(cost - weight, dtype=torch.uint8, device="meta"),
                persistent=False,
            )
        keys = [_accelerate_key(n) for n in self.names]
        max_memory: dict[int | str, int | str] = {k: max(lim, 0) for k, lim in zip(keys, limits)}
        # accelerate keeps room for the largest layer on the first device in case it must offload a
        # layer there later; we never offload, so give that room back.
        max_memory[keys[0]] = int(max_memory[keys[0]]) + max(costs)
        with _quiet_accelerate():
            dm = infer_auto_device_map(
                layers,
                max_memory=max_memory,
                no_split_module_classes=[DalleLayer.__name__],
                dtype=self.dtype,
                clean_result=False,
            )
        by_key = {k: n for k, n in zip(keys, self.names)}
        layer_devices = []
        for i in range(len(layers)):
            where = dm.get(str(i), "disk")
            if where not in by_key:  # "disk" or "cpu" offload: it did not fit
                return None
            layer_devices.append(by_key[where])
        return layer_devices

    def plan(self, batch: int, layer_devices: list[str]) -> PlacementPlan:
        stages = _contiguous_stages(layer_devices, self.names)
        device_map = {m: self.first for m in EMBEDDING_MODULES}
        device_map.update({f"{LAYER_PREFIX}{i}": d for i, d in enumerate(layer_devices)})
        device_map.update({m: self.main for m in HEAD_MODULES})
        weight = {n: self.fixed_weights(n) for n in self.names}
        kv = dict.fromkeys(self.names, 0)
        for i, d in enumerate(layer_devices):
            weight[d] += self.layer_weights[i]
            kv[d] += self.kv_per_image[i]
        return PlacementPlan(
            device_map=device_map,
            main_device=self.main,
            stages=stages,
            batch_limit=batch,
            dtype=self.dtype,
            windowed=self.windowed,
            weight_bytes=weight,
            kv_bytes_per_image=kv,
            activation_bytes_per_image={n: self.per_image_act(n) for n in self.names},
            fixed_bytes={n: self.fixed_other(n) for n in self.names},
            free_bytes={d.name: d.free_bytes for d in self.devices},
            reserve_bytes=self.reserve,
            devices=list(self.names),
        )


def _contiguous_stages(layer_devices: Sequence[str], order: Sequence[str]) -> list[tuple[str, int, int]]:
    """Runs of equal devices -> [(device, first, last)]; each device may own one run, in device order."""
    stages: list[tuple[str, int, int]] = []
    for i, d in enumerate(layer_devices):
        if stages and stages[-1][0] == d:
            stages[-1] = (d, stages[-1][1], i)
        else:
            stages.append((d, i, i))
    seen = [d for d, _, _ in stages]
    if len(set(seen)) != len(seen) or seen != sorted(seen, key=list(order).index):
        raise PlacementError(f"layers are not in contiguous stages in device order: {stages}")
    return stages


def plan_placement(
    cfg: DalleConfig,
    devices: Sequence[DeviceSpec],
    dtype: torch.dtype,
    max_batch_images: int | None = None,
    *,
    reserve_bytes: int | None = None,
    other_nets_bytes: int | None = None,
    windowed: bool = True,
    batch_cap: int = DEFAULT_BATCH_CAP,
) -> PlacementPlan:
    """Place the transformer on ``devices`` (the first is the main device) for a batch of images.

    ``max_batch_images`` None or 0: the batch limit is the largest batch (at most ``batch_cap``) that
    fits; otherwise exactly that batch must fit. ``reserve_bytes`` (per device) and
    ``other_nets_bytes`` (main device) default to the GPU or CPU constants above. Raises PlacementError
    saying how much memory is missing when it does not fit.
    """
    if not devices:
        raise PlacementError("no devices to place the model on")
    names = [d.name for d in devices]
    if len(set(names)) != len(names):
        raise PlacementError(f"devices are listed twice: {names}")
    if max_batch_images is not None and max_batch_images < 0:
        raise PlacementError(
            f"max_batch_images must be >= 0 (0 = derive from memory), got {max_batch_images}"
        )
    on_cpu = torch.device(names[0]).type == "cpu"
    if reserve_bytes is None:
        reserve_bytes = CPU_RESERVE_BYTES if on_cpu else DEFAULT_RESERVE_BYTES
    if other_nets_bytes is None:
        other_nets_bytes = CPU_OTHER_NETS_BYTES if on_cpu else DEFAULT_OTHER_NETS_BYTES
    planner = _Planner(cfg, devices, dtype, windowed, reserve_bytes, other_nets_bytes)
    fits = planner.split
    if max_batch_images:
        attempt = fits(max_batch_images)
        if attempt.layer_devices is None:
            best = _largest_fitting(fits, max_batch_images - 1)
            hint = f"at most {best} images fit" if best else "not even one image fits"
            raise PlacementError(
                f"max_batch_images={max_batch_images} does not fit on {', '.join(names)} ({dtype}): "
                f"{_amount(attempt.shortfall)} missing; {hint}"
            )
        plan = planner.plan(max_batch_images, attempt.layer_devices)
    else:
        best = _largest_fitting(fits, batch_cap)
        if not best:
            need = fits(1).shortfall
            raise PlacementError(
                f"the model ({_amount(sum(planner.layer_weights))} of layers in {dtype}) with a "
                f"one-image batch does not fit on {', '.join(names)}: {_amount(need)} missing "
                f"(free memory minus {_amount(reserve_bytes)} reserve per device and "
                f"{_amount(other_nets_bytes)} for the other networks on {names[0]})"
            )
        attempt = fits(best)
        assert attempt.layer_devices is not None  # _largest_fitting checked it
        plan = planner.plan(best, attempt.layer_devices)
    log.info(
        "placement: batch limit %d, stages %s, main device %s",
        plan.batch_limit,
        ", ".join(f"{d}[{a}..{b}]" for d, a, b in plan.stages),
        plan.main_device,
    )
    return plan


def _largest_fitting(fits: Callable[[int], _Attempt], upper: int) -> int:
    """The largest batch in 1..upper that fits (0 if none): more images never need less memory."""
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid).layer_devices is not None:
            lo = mid
        else:
            hi = mid - 1
    return lo


def bytes_read_per_step(
    cfg: DalleConfig, dtype: torch.dtype, batch: int, step: int, windowed: bool = True
) -> int:
    """The least a decode step must read from memory: every layer's weights, the head and the KV cache.

    The head is ``transformer.final_layernorm``, ``to_logits[0]`` and the image rows of ``to_logits[1]``
    (the decoder computes only image logits). ``step`` is the image token being produced
    (0..image_seq_length-1); the cache then holds ``n_text + step`` positions, capped by each layer's
    window. A step that attends over whole preallocated caches (graph capture) reads more than this.
    """
    size = _dtype_bytes(dtype)
    h, iv = cfg.hidden_size, cfg.image_vocab_size
    norms_per_layer = 4 if cfg.cogview_sandwich_layernorm else 2
    layer_weights = cfg.num_layers * (12 * h * h + 9 * h + norms_per_layer * 2 * h)
    head_weights = 2 * (2 * h) + iv * h + iv
    seen = cfg.n_text + step
    kv = sum(
        2 * batch * min(seen, kv_positions(cfg, i, windowed)) * h * size for i in range(cfg.num_layers)
    )
    return (layer_weights + head_weights) * size + kv


def mean_bytes_read_per_step(
    cfg: DalleConfig, dtype: torch.dtype, batch: int, windowed: bool = True
) -> float:
    """``bytes_read_per_step`` averaged over every image token step."""
    steps = cfg.image_seq_length
    return sum(bytes_read_per_step(cfg, dtype, batch, s, windowed) for s in range(steps)) / steps
