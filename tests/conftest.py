import os

# Tests run on CPU; multi-device tests start their own subprocesses with XLA_FLAGS set.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from llava_jax.models.config import LlavaConfig, TextConfig, VisionConfig  # noqa: E402


def tiny_llava_config(**overrides) -> LlavaConfig:
    """A tiny LLaVA: 2-layer CLIP at 28 px / patch 14 (4 patches), 2-layer LLaMA with GQA."""
    vision = VisionConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                          num_layers=3, num_heads=4)
    text = TextConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
    base = dict(vision=vision, text=text, projector_type="mlp2x_gelu", vision_feature_layer=-2,
                vision_feature_select_strategy="default", image_token_id=127, pad_token_id=0,
                dtype="float32", remat_policy="none")
    base.update(overrides)
    return LlavaConfig(**base)


@pytest.fixture
def tiny_config():
    return tiny_llava_config()
