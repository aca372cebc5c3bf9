"""transformers (PyTorch) reference models built from our LlavaConfig, for parity and converter tests.

`hf_llava / hf_llava_next / hf_llama / hf_clip` build a random-weight HF model (eager attention, fp32, eval mode);
`canonical_state_dict` gives its tensors under the canonical llava-hf key names (the save format of
docs/internals.md) and `ours_from_hf` loads them into our module through llava_jax.hf.keys.
"""
from __future__ import annotations

import numpy as np
import torch
import transformers
from flax import nnx

from llava_jax.hf import keys
from llava_jax.hf.configs import to_hf
from llava_jax.models.clip import CLIPVisionTower
from llava_jax.models.config import LlavaConfig
from llava_jax.models.llama import LlamaModel
from llava_jax.models.llava import LlavaModel


def _hf_dicts(config: LlavaConfig):
    # to_hf only knows the llava-hf projector; the towers' configs do not depend on it.
    d = to_hf(config.replace(projector_type="mlp2x_gelu"))
    strip = lambda c: {k: v for k, v in c.items() if k != "model_type"}
    return d, strip(d["vision_config"]), strip(d["text_config"])


def _randomize(model: torch.nn.Module, seed: int, std: float):
    """Weights large enough that every layer visibly changes the output (HF's init is ~0.02)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)
    return model.eval()


def _eager_random(model_cls, hf_cfg, seed: int, std: float):
    """model_cls(hf_cfg) with eager attention and _randomize'd weights, in eval mode."""
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return _randomize(model_cls(hf_cfg), seed, std)


def _hf_vlm(config: LlavaConfig, config_cls, model_cls, seed: int, std: float):
    d, vision, text = _hf_dicts(config)
    kw = {k: v for k, v in d.items() if k not in ("model_type", "architectures", "vision_config", "text_config")}
    hf_cfg = config_cls(vision_config=transformers.CLIPVisionConfig(**vision),
                        text_config=transformers.LlamaConfig(**text), **kw)
    return _eager_random(model_cls, hf_cfg, seed, std)


def hf_llava(config: LlavaConfig, seed: int = 0, std: float = 0.1):
    return _hf_vlm(config, transformers.LlavaConfig, transformers.LlavaForConditionalGeneration, seed, std)


def hf_llava_next(config: LlavaConfig, seed: int = 0, std: float = 0.1):
    """LlavaNextForConditionalGeneration (LLaVA-1.6, AnyRes) for a config with image_grid_pinpoints."""
    return _hf_vlm(config, transformers.LlavaNextConfig, transformers.LlavaNextForConditionalGeneration, seed, std)


def hf_llama(config: LlavaConfig, seed: int = 0, std: float = 0.1):
    _, _, text = _hf_dicts(config)
    return _eager_random(transformers.LlamaForCausalLM, transformers.LlamaConfig(**text), seed, std)


def hf_clip(config: LlavaConfig, seed: int = 0, std: float = 0.1):
    _, vision, _ = _hf_dicts(config)
    return _eager_random(transformers.CLIPVisionModel, transformers.CLIPVisionConfig(**vision), seed, std)


def _canonical_name(model, key: str) -> str:
    if isinstance(model, (transformers.LlavaForConditionalGeneration, transformers.LlavaNextForConditionalGeneration)):
        for old, new in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                         ("model.vision_tower.", "vision_tower."),
                         ("model.multi_modal_projector.", "multi_modal_projector."),
                         ("model.image_newline", "image_newline")):
            if key.startswith(old):
                return new + key[len(old):]
        raise KeyError(f"unexpected {type(model).__name__} key {key!r}")
    if isinstance(model, transformers.LlamaForCausalLM):
        return ("language_model.model." + key[len("model."):] if key.startswith("model.")
                else "language_model." + key)
    if isinstance(model, transformers.CLIPVisionModel):
        return "vision_tower." + key
    raise TypeError(f"no canonical names for {type(model).__name__}")


def canonical_state_dict(model) -> dict:
    """HF model tensors as numpy arrays under canonical llava-hf names (tied lm_head dropped, as
    save_pretrained does)."""
    tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    out = {}
    for key, value in model.state_dict().items():
        name = _canonical_name(model, key)
        if tied and name == "language_model.lm_head.weight":
            continue
        out[name] = value.detach().cpu().numpy().copy()
    return out


def ours_from_hf(model, config: LlavaConfig):
    """Our module for an HF model (LlavaModel / LlamaModel / CLIPVisionTower) with its weights."""
    tensors = canonical_state_dict(model)
    # Abstract construction: every parameter is overwritten, so random init would be wasted time.
    abstract = lambda make: nnx.eval_shape(lambda: make(nnx.Rngs(0)))
    if isinstance(model, (transformers.LlavaForConditionalGeneration, transformers.LlavaNextForConditionalGeneration)):
        return keys.load_into_model(abstract(lambda r: LlavaModel(config, rngs=r)), tensors, config)
    kw = dict(dtype=config.dtype, remat_policy=config.remat_policy)
    if isinstance(model, transformers.LlamaForCausalLM):
        ours = abstract(lambda r: LlamaModel(config.text, rngs=r, **kw))
        return keys.load_into_model(ours, tensors, config, component="language_model")
    if isinstance(model, transformers.CLIPVisionModel):
        ours = abstract(lambda r: CLIPVisionTower(config.vision, rngs=r, **kw))
        return keys.load_into_model(ours, tensors, config, component="vision_tower")
    raise TypeError(f"no JAX counterpart for {type(model).__name__}")


def to_torch(x, dtype=None) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(np.asarray(x)))
    return t if dtype is None else t.to(dtype)


def nhwc_to_nchw(pixels) -> torch.Tensor:
    """Our channels-last pixel_values -> the (N, C, H, W) tensor HF expects."""
    return to_torch(np.asarray(pixels).transpose(0, 3, 1, 2))


def jitted(module, method: str = "__call__", **static):
    """module.method compiled once over its state (the functional split/merge the trainer uses);
    eager NNX calls dispatch op by op and are far slower on CPU. `static` kwargs are bound as
    Python values (flags, layer tuples)."""
    import jax

    graphdef, state = nnx.split(module)

    @jax.jit
    def run(state, *args, **kwargs):
        return getattr(nnx.merge(graphdef, state), method)(*args, **kwargs, **static)

    return lambda *args, **kwargs: run(state, *args, **kwargs)
