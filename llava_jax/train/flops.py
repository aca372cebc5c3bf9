"""Explicit FLOP accounting of a train step, for MFU.

Counted as 2 FLOPs per multiply-add of the matmuls and attention products (norms, activations and
softmax are ignored, as is customary). What each stage computes:
  vision tower  forward only, always frozen; only the layers up to the selected feature layer
  projector     forward + weight gradients (2x forward): its input (vision features) needs no gradient
  LLM           stage 2: forward + input and weight gradients (3x forward)
                stage 1: forward + input gradients only (2x forward): the LLM is frozen, but the
                gradient must still flow through it back to the projector
Causal self-attention is counted at half of the full S x S product. Padded positions and empty
image slots are computed by the hardware, so they are counted too (the step's shapes decide).
The vocabulary projection is counted at every position, as a full-sequence implementation computes
it; the train step computes it only over a bucket that holds the target positions
(llava_jax.train.target_loss), so an MFU from these counts credits those skipped FLOPs as done.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from llava_jax.models.config import LlavaConfig, config_from_any

# Dense bf16 peak FLOP/s per device (per chip for TPUs: what jax.devices() lists).
PEAK_FLOPS = {
    "TPU v2": 45e12 / 2,
    "TPU v3": 123e12 / 2,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def vision_layers_used(cfg: LlavaConfig) -> int:
    """Encoder layers needed to reach the selected hidden state (hidden_states[0] = embeddings)."""
    total = cfg.vision.num_layers
    return max((layer if layer >= 0 else total + 1 + layer) for layer in cfg.feature_layers)


def vision_forward_flops(cfg: LlavaConfig) -> float:
    """One image through the vision tower, forward."""
    v = cfg.vision
    n = v.num_positions
    d, f = v.hidden_size, v.intermediate_size
    patch = 2.0 * v.num_patches * (v.patch_size ** 2 * v.num_channels) * d
    per_layer = 2.0 * n * (4 * d * d + 2 * d * f) + 4.0 * n * n * d
    return patch + vision_layers_used(cfg) * per_layer


def projector_forward_flops(cfg: LlavaConfig) -> float:
    """One image's features through the projector, forward."""
    t = cfg.num_image_tokens
    d_in, d_out = cfg.vision_feature_dim, cfg.text.hidden_size
    if cfg.projector_type == "identity":
        return 0.0
    if cfg.projector_type == "linear":
        return 2.0 * t * d_in * d_out
    depth = int(cfg.projector_type[len("mlp"):].split("x")[0])
    return 2.0 * t * (d_in * d_out + (depth - 1) * d_out * d_out)


def llm_forward_flops_per_token(cfg: LlavaConfig, seq_len: int) -> float:
    """One token through the decoder and the vocabulary projection, forward, at row length seq_len."""
    t = cfg.text
    d, f, hd = t.hidden_size, t.intermediate_size, t.head_dim
    q, kv = t.num_heads * hd, t.num_kv_heads * hd
    matmuls = 2.0 * (d * q + 2 * d * kv + q * d + 3 * d * f)
    attention = 4.0 * q * seq_len / 2  # scores + weighted values, causal half
    return t.num_layers * (matmuls + attention) + 2.0 * d * t.vocab_size


@dataclasses.dataclass(frozen=True)
class StepFlops:
    vision: float
    projector: float
    llm: float

    @property
    def total(self) -> float:
        return self.vision + self.projector + self.llm


def step_flops(model_config, stage: int, batch_size: int, seq_len: int, images_per_row: int) -> StepFlops:
    """FLOPs of one optimizer step over a global batch of (batch_size, seq_len) rows."""
    cfg = config_from_any(model_config)
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    images = batch_size * images_per_row
    llm_multiplier = 3.0 if stage == 2 else 2.0
    return StepFlops(
        vision=images * vision_forward_flops(cfg),
        projector=images * 2.0 * projector_forward_flops(cfg),
        llm=batch_size * seq_len * llm_multiplier * llm_forward_flops_per_token(cfg, seq_len))


def flops_per_token(model_config, stage: int, seq_len: int, images_per_row: int) -> float:
    return step_flops(model_config, stage, 1, seq_len, images_per_row).total / seq_len


def peak_flops(device) -> Optional[float]:
    """Peak bf16 FLOP/s of a jax device from its device_kind, None when unknown (e.g. CPU)."""
    kind = getattr(device, "device_kind", "") or ""
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if kind.lower().startswith(name.lower()):
            return PEAK_FLOPS[name]
    return None


def mfu(step_flops_total: float, seconds_per_step: float, num_devices: int,
        peak_per_device: Optional[float]) -> Optional[float]:
    if not peak_per_device or seconds_per_step <= 0:
        return None
    return step_flops_total / (seconds_per_step * num_devices * peak_per_device)
