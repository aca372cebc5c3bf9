"""Models: CLIP vision tower, projector, LLaMA decoder and the LLaVA composition."""
from llava_jax.models.clip import CLIPOutput, CLIPVisionTower
from llava_jax.models.config import LlavaConfig, RopeScaling, TextConfig, VisionConfig, config_from_any
from llava_jax.models.llama import LlamaModel, default_positions, default_segment_ids
from llava_jax.models.llava import LlavaModel
from llava_jax.models.projector import Projector, projector_depth

__all__ = [
    "CLIPOutput", "CLIPVisionTower", "LlamaModel", "LlavaConfig", "LlavaModel", "Projector", "RopeScaling",
    "TextConfig", "VisionConfig", "config_from_any", "default_positions", "default_segment_ids",
    "projector_depth",
]
