"""HF `config.json` <-> our model config (llava_jax.models.config): the llava-hf LlavaConfig mapping,
its vision (CLIP) and text (LLaMA/Mistral) parts, and the configs of HF folders on disk.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from llava_jax.models.config import LlavaConfig, RopeScaling, TextConfig, VisionConfig
from llava_jax.models.projector import projector_depth


def vision_from_hf(v: dict) -> VisionConfig:
    return VisionConfig(
        image_size=v["image_size"], patch_size=v["patch_size"], num_channels=v.get("num_channels", 3),
        hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
        num_layers=v["num_hidden_layers"], num_heads=v["num_attention_heads"],
        layer_norm_eps=v.get("layer_norm_eps", 1e-5), hidden_act=v.get("hidden_act", "quick_gelu"))


def vision_to_hf(v: VisionConfig) -> dict:
    return dict(model_type="clip_vision_model", image_size=v.image_size, patch_size=v.patch_size,
                num_channels=v.num_channels, hidden_size=v.hidden_size,
                intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
                num_attention_heads=v.num_heads, layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act)


def text_from_hf(t: dict) -> TextConfig:
    rope = dict(t.get("rope_parameters") or {})
    legacy = t.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    params = {**legacy, **rope}
    scaling = None
    if rope_type != "default":
        kw = {k: params[k] for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
              if k in params}
        scaling = RopeScaling(rope_type=rope_type, factor=float(params["factor"]), **kw)
    return TextConfig(
        vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
        num_layers=t["num_hidden_layers"], num_heads=t["num_attention_heads"],
        num_kv_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
        head_dim=t.get("head_dim"), rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        rope_theta=float(params.get("rope_theta", t.get("rope_theta", 10000.0))), rope_scaling=scaling,
        max_position_embeddings=t.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(t.get("tie_word_embeddings", False)),
        bos_token_id=t.get("bos_token_id", 1) if t.get("bos_token_id") is not None else 1,
        eos_token_id=_first(t.get("eos_token_id", 2)), hf_model_type=_decoder_type(t))


def _decoder_type(t: dict) -> str:
    kind = t.get("model_type", "llama")
    if kind not in ("llama", "mistral"):
        raise ValueError(f"unsupported text_config model_type {kind!r}; expected 'llama' or 'mistral'")
    window = t.get("sliding_window")
    if kind == "mistral" and window is not None and window < t.get("max_position_embeddings", 0):
        raise ValueError(f"text_config has sliding_window={window}: sliding-window attention is not supported "
                         f"(LLaVA-1.6-Mistral's Mistral-7B-Instruct-v0.2 has none)")
    return kind


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else (2 if x is None else x)


def text_to_hf(t: TextConfig) -> dict:
    rope = {"rope_type": "default", "rope_theta": t.rope_theta}
    if t.rope_scaling is not None:
        s = t.rope_scaling
        rope = {"rope_type": s.rope_type, "factor": s.factor, "rope_theta": t.rope_theta}
        if s.rope_type == "llama3":
            rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                        original_max_position_embeddings=s.original_max_position_embeddings)
    # Mistral's config has no attention_bias / mlp_bias and a sliding_window (None: full attention).
    extra = dict(sliding_window=None) if t.hf_model_type == "mistral" else dict(attention_bias=False, mlp_bias=False)
    return dict(model_type=t.hf_model_type, vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
                num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps, rope_parameters=rope,
                max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=t.tie_word_embeddings,
                bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, hidden_act="silu", **extra)


def from_hf(d: dict) -> LlavaConfig:
    """LlavaConfig from a llava-hf `config.json` dict."""
    act = d.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"unsupported projector_hidden_act {act!r} in llava config; expected 'gelu'")
    layer = d.get("vision_feature_layer", -2)
    return LlavaConfig(
        vision=vision_from_hf(d["vision_config"]), text=text_from_hf(d["text_config"]),
        projector_type="mlp2x_gelu",
        vision_feature_layer=tuple(layer) if isinstance(layer, list) else layer,
        vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
        image_token_id=d.get("image_token_index", d.get("image_token_id", 32000)),
        pad_token_id=d.get("pad_token_id") if d.get("pad_token_id") is not None else 0,
        image_grid_pinpoints=_pinpoints_from_hf(d))


def _pinpoints_from_hf(d: dict):
    if d.get("model_type") != "llava_next":
        return None
    return tuple(tuple(p) for p in d.get("image_grid_pinpoints") or ((336, 672), (672, 336), (672, 672),
                                                                     (1008, 336), (336, 1008)))


def to_hf(c: LlavaConfig) -> dict:
    """The llava-hf `config.json` dict; only the 'mlp2x_gelu' projector exists in that format."""
    if c.projector_type != "mlp2x_gelu":
        raise ValueError(f"projector {c.projector_type!r} has no llava-hf equivalent "
                         "(LlavaForConditionalGeneration only has the 2-layer GELU MLP)")
    layer = c.vision_feature_layer
    out = dict(model_type="llava", architectures=["LlavaForConditionalGeneration"],
               vision_config=vision_to_hf(c.vision), text_config=text_to_hf(c.text),
               image_token_index=c.image_token_id, image_seq_length=c.num_image_tokens,
               projector_hidden_act="gelu", multimodal_projector_bias=True,
               vision_feature_layer=list(layer) if isinstance(layer, tuple) else layer,
               vision_feature_select_strategy=c.vision_feature_select_strategy,
               pad_token_id=c.pad_token_id, tie_word_embeddings=c.text.tie_word_embeddings)
    if c.anyres:  # LlavaNextForConditionalGeneration: the same keys plus the grids (and image_newline weights)
        out.update(model_type="llava_next", architectures=["LlavaNextForConditionalGeneration"],
                   image_grid_pinpoints=[list(p) for p in c.image_grid_pinpoints])
    return out


# ----- HF folders on disk ---------------------------------------------------------------------

def hf_llava_config(folder: str):
    """Our LlavaConfig from a llava-hf folder's config.json (transformers fills omitted defaults)."""
    import transformers

    _raw_config(folder)  # a folder without config.json: said here, not in transformers' traceback
    hf = transformers.AutoConfig.from_pretrained(folder)
    if hf.model_type not in ("llava", "llava_next"):
        raise ValueError(f"{folder}/config.json has model_type {hf.model_type!r}; --hf-llava expects a llava-hf "
                         "folder (model_type 'llava' or 'llava_next'); use --clip/--llm for separate CLIP and "
                         "LLaMA folders")
    return from_hf(hf.to_dict())


def _raw_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {folder}")
    with open(path) as f:
        return json.load(f)


def clip_llm_config(clip_dir: str, llm_dir: str, projector_type: Optional[str] = None,
                    image_token_id: Optional[int] = None, vision_feature_layer: Optional[int] = None,
                    dtype: str = "float32", image_grid_pinpoints=None):
    """Our LlavaConfig for CLIP + LLaMA folders. Settings the original LLaVA stored in the LLM's
    config.json (mm_projector_type, mm_vision_select_layer/feature, and for LLaVA-1.6
    image_grid_pinpoints with image_aspect_ratio 'anyres') are used unless given here."""
    import transformers

    raw = _raw_config(llm_dir)
    _raw_config(clip_dir)  # likewise for the CLIP folder
    projector_type = projector_type or raw.get("mm_projector_type") or "mlp2x_gelu"
    projector_depth(projector_type)  # ValueError naming the accepted forms
    vision = vision_from_hf(transformers.CLIPVisionConfig.from_pretrained(clip_dir).to_dict())
    # A Mistral folder keeps model_type 'mistral' (exported as such); both are read as LLaMA decoders.
    text_class = transformers.MistralConfig if raw.get("model_type") == "mistral" else transformers.LlamaConfig
    text_hf = text_class.from_pretrained(llm_dir).to_dict()
    text = text_from_hf(text_hf)
    if image_grid_pinpoints is None and raw.get("image_aspect_ratio") == "anyres":
        image_grid_pinpoints = raw.get("image_grid_pinpoints")
    strategy = {"patch": "default", "cls_patch": "full"}.get(raw.get("mm_vision_select_feature"), "default")
    layer = vision_feature_layer if vision_feature_layer is not None else raw.get("mm_vision_select_layer", -2)
    return LlavaConfig(vision=vision, text=text, projector_type=projector_type, vision_feature_layer=layer,
                       vision_feature_select_strategy=strategy,
                       # the first id past the vocabulary, like llava-hf's <image> = 32000 for LLaMA
                       image_token_id=text.vocab_size if image_token_id is None else image_token_id,
                       pad_token_id=text_hf.get("pad_token_id") or 0, dtype=dtype,
                       image_grid_pinpoints=image_grid_pinpoints)
