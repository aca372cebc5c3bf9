"""What a compiled train step costs per chip (XLA's cost analysis) and a roofline step time.

XLA's `cost_analysis()` of an SPMD program gives one device's FLOPs and HBM bytes accessed, but it
counts the body of a loop once whatever its trip count: the scanned layers (vision and decoder),
the gradient-accumulation loop and the chunked loss would each be counted once. So the cost is read
from three small compiles of the same step at the same per-device shapes, without microbatching or
loss chunks and with the layer scans unrolled (`layers.unrolled_layer_scans`):
  F(1, 1)  one decoder layer, one vision layer;  F(2, 1)  two decoder layers;  F(1, 2)  two vision
and scaled to the real depth: F = F(1, 1) + (L_text - 1) * (F(2, 1) - F(1, 1))
                                   + (L_vision - 1) * (F(1, 2) - F(1, 1)).
The optimizer update and the embeddings are in F(1, 1) once, as in the real step. Shallow models
fit where deep ones do not, so these compiles rarely run out of memory even for a whole batch.

The roofline time max(FLOPs / peak, bytes / bandwidth) is a lower bound: it ignores collectives,
and XLA's byte counts assume no reuse beyond fusion. A Pallas kernel (splash attention) is a custom
call whose work XLA does not count: with it the FLOPs leave out the attention products (for
LLaVA-1.5-7B at 2048 tokens ~4% of the step's model FLOPs; `llava-jax aot --attention xla` counts
them, as the full S x S square).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from llava_jax.train.flops import PEAK_FLOPS, vision_layers_used

GB = 1e9
# HBM bandwidth per jax device (a chip; a TensorCore on v2/v3, so half the chip) in bytes/s.
# Sources: cloud.google.com/tpu/docs/v2, /v3, /v4, /v5e, /v5p, /v6e ("HBM bandwidth" in each chip's
# table: v2 700 GB/s, v3 900 GB/s per chip; v4 1228 GB/s; v5e 819 GB/s; v5p 2765 GB/s;
# v6e 1640 GB/s); A100 80GB SXM: nvidia.com A100 datasheet (2039 GB/s); H100 SXM: 3350 GB/s.
HBM_BANDWIDTH = {
    "TPU v2": 700 * GB / 2,
    "TPU v3": 900 * GB / 2,
    "TPU v4": 1228 * GB,
    "TPU v5 lite": 819 * GB,
    "TPU v5e": 819 * GB,
    "TPU v5p": 2765 * GB,
    "TPU v5": 2765 * GB,
    "TPU v6 lite": 1640 * GB,
    "TPU v6e": 1640 * GB,
    "NVIDIA A100": 2039 * GB,
    "NVIDIA H100": 3350 * GB,
    "NVIDIA H200": 4800 * GB,
}
# Peak dense bf16 FLOP/s per device: llava_jax.train.flops.PEAK_FLOPS (the MFU table; sources
# there and the same Cloud TPU pages: v4 275e12, v5e 197e12, v5p 459e12, v6e 918e12, A100 312e12).


def _lookup(table: dict, device_kind: str) -> float:
    for name in sorted(table, key=len, reverse=True):
        if device_kind.lower().startswith(name.lower()):
            return table[name]
    return 0.0


@dataclasses.dataclass(frozen=True)
class Chip:
    kind: str
    peak_flops: float  # bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s

    @classmethod
    def of(cls, device_kind: str) -> "Chip":
        return cls(device_kind, _lookup(PEAK_FLOPS, device_kind), _lookup(HBM_BANDWIDTH, device_kind))

    @classmethod
    def per_device(cls, devices) -> "Chip":
        """The share of one jax device: libtpu's compile-only v4 topologies list each TensorCore
        as a device (two per chip), where a v4 VM shows one megacore device per chip."""
        chip = cls.of(devices[0].device_kind)
        share = len(devices) / num_chips(devices)
        return cls(chip.kind, chip.peak_flops / share, chip.hbm_bandwidth / share)


def num_chips(devices) -> int:
    """Distinct chips among TPU devices (by their chip coordinates), else the device count."""
    coords = {tuple(getattr(d, "coords", None) or (i,)) for i, d in enumerate(devices)}
    return len(coords)


@dataclasses.dataclass(frozen=True)
class StepCost:
    """One device's FLOPs and HBM bytes for one whole train step (all microbatches)."""
    flops: float
    hbm_bytes: float

    def roofline_seconds(self, chip: Chip) -> Optional[float]:
        if not chip.peak_flops or not chip.hbm_bandwidth:
            return None
        return max(self.flops / chip.peak_flops, self.hbm_bytes / chip.hbm_bandwidth)

    def bound(self, chip: Chip) -> str:
        return "compute" if self.flops / chip.peak_flops >= self.hbm_bytes / chip.hbm_bandwidth else "memory"


def _analysis(compiled) -> tuple:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):  # older jax: one dict per program
        ca = ca[0]
    return float(ca.get("flops", 0.0)), float(ca.get("bytes accessed", 0.0))


def _variant(config, text_layers: int, vision_layers_used_: int):
    """The TrainConfig at the same shapes with a shallow model, no microbatches and no loss chunks."""
    cfg = config.model
    # keep the distance between the last layer and the feature layer (e.g. -2 -> one unused)
    vision_layers = cfg.vision.num_layers - vision_layers_used(cfg) + vision_layers_used_
    model = cfg.replace(text=dataclasses.replace(cfg.text, num_layers=text_layers),
                        vision=dataclasses.replace(cfg.vision, num_layers=vision_layers))
    return config.replace(model=model, microbatch_size=0, loss_chunk_size=0)


def step_cost(config, devices, compile_fn=None) -> StepCost:
    """Per-device cost of `config`'s train step (a TrainConfig or its ConfigDict) on `devices` from
    three shallow unrolled compiles.

    compile_fn(train_config, devices) -> (mesh, compiled); default `aot.compile_train_step`."""
    from llava_jax.models import layers
    from llava_jax.train.config import train_config

    if compile_fn is None:
        from llava_jax.aot import compile_train_step as compile_fn
    config = train_config(config)
    cfg = config.model
    if any(layer >= 0 for layer in cfg.feature_layers):
        raise ValueError("the cost model needs vision_feature_layer counted from the end (e.g. -2)")
    with layers.unrolled_layer_scans():
        base, text2, vision2 = (_analysis(compile_fn(_variant(config, t, v), devices)[1])
                                for t, v in ((1, 1), (2, 1), (1, 2)))
    lt, lv = cfg.text.num_layers, vision_layers_used(cfg)

    def scaled(i):
        return base[i] + (lt - 1) * (text2[i] - base[i]) + (lv - 1) * (vision2[i] - base[i])

    return StepCost(flops=scaled(0), hbm_bytes=scaled(1))
