"""LlavaModel: CLIP tower -> projector -> features spliced into the LLaMA input embeddings.

The API and semantics are pinned down in docs/internals.md ("The model").
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.models import layers as L
from llava_jax.models import layout as layout_lib
from llava_jax.models import llava_next
from llava_jax.models import lora as lora_lib
from llava_jax.models.clip import CLIPVisionTower
from llava_jax.models.config import LlavaConfig, config_from_any
from llava_jax.models.llama import LlamaModel, default_positions, default_segment_ids
from llava_jax.models.projector import Projector, projector_depth


def _concrete(x) -> Optional[np.ndarray]:
    """x as numpy when it is a concrete value, None when it is traced."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


class LlavaModel(nnx.Module):
    def __init__(self, config, *, rngs: nnx.Rngs, lora=None, layout: layout_lib.DecoderLayout = layout_lib.TRAINING):
        """lora: a `models.lora.LoraConfig` puts LoRA adapters on the language model's projections;
        layout: how the language model's decoder is built (`models.layout`; training's by default)."""
        config = config_from_any(config)
        self.config = config
        # Fail on a bad projector type before anything is compiled.
        projector_depth(config.projector_type)
        self.vision_tower, self.projector, self.language_model = L.build(lambda r: (
            CLIPVisionTower(config.vision, dtype=config.dtype, remat_policy=config.remat_policy,
                            attention_impl=config.attention_impl, rngs=r),
            Projector(config.projector_type, config.vision_feature_dim, config.text.hidden_size,
                      dtype=config.dtype, rngs=r),
            LlamaModel(config.text, dtype=config.dtype, remat_policy=config.remat_policy, rngs=r, lora=lora,
                       attention_impl=config.attention_impl, layout=layout)), rngs)
        if config.anyres:
            # LLaVA-1.6's learned vector that ends every row of tile features. It lives with the
            # projector (parameter counts, stage freezing and the optimizer's projector group see it).
            d = config.text.hidden_size
            self.projector.image_newline = L.param(rngs, L.normal_init(d ** -0.5), (d,), ("embed",))

    # ----- vision -------------------------------------------------------------------------------
    def vision_features(self, pixel_values, frozen: bool = True):
        """(N, H, W, 3) normalized pixels -> the tower features the projector reads (N, T, D_vision).

        The vision tower is frozen in LLaVA's training, so no gradient flows into it; `frozen=False`
        is for the one recipe that trains it (the quickstart's stage 1, llava_jax.quickstart.align)."""
        cfg = self.config
        selected = self.vision_tower.select_hidden_states(pixel_values, cfg.feature_layers)
        if cfg.vision_feature_select_strategy == "default":
            selected = tuple(h[:, 1:] for h in selected)
        features = jnp.concatenate(selected, axis=-1)
        return jax.lax.stop_gradient(features) if frozen else features

    def image_features(self, pixel_values, frozen: bool = True):
        """(N, H, W, 3) normalized pixels -> projected features (N, T, D_text), T = num_image_tokens."""
        return self.projector(self.vision_features(pixel_values, frozen))

    def _splice_images(self, input_ids, embeds, pixel_values, image_sizes=None):
        """Replace each placeholder's embedding by the next image feature token (see internals.md)."""
        cfg = self.config
        if cfg.anyres:
            return self._splice_anyres(input_ids, embeds, pixel_values, image_sizes)
        t = cfg.num_image_tokens
        is_image = input_ids == cfg.image_token_id
        ids = _concrete(input_ids)
        if pixel_values.ndim == 4:
            n = pixel_values.shape[0]
            if ids is not None:
                self._check_counts(int((ids == cfg.image_token_id).sum()), n, "")
            # Any row may take any image, so every device needs all features (they are small).
            feats = L.constrain_act(self.image_features(pixel_values).reshape(n * t, -1), (None, "act_embed"))
            order = jnp.cumsum(is_image.reshape(-1)) - 1
            gathered = jnp.take(feats, jnp.clip(order, 0, n * t - 1), axis=0).reshape(embeds.shape)
        elif pixel_values.ndim == 5:
            b, m = pixel_values.shape[:2]
            if ids is not None:
                for row, count in enumerate((ids == cfg.image_token_id).sum(axis=1)):
                    self._check_counts(int(count), m, f" in row {row} (pixel_values has {m} image slots per row)")
            feats = self.image_features(pixel_values.reshape(b * m, *pixel_values.shape[2:])).reshape(b, m * t, -1)
            feats = L.constrain_act(feats, ("act_batch", None, "act_embed"))
            order = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, m * t - 1)
            gathered = jnp.take_along_axis(feats, order[..., None], axis=1)
        else:
            raise ValueError(f"pixel_values must be (N, H, W, 3) or (B, M, H, W, 3); got shape {pixel_values.shape}")
        return L.constrain_act(jnp.where(is_image[..., None], gathered.astype(embeds.dtype), embeds))

    def _splice_anyres(self, input_ids, embeds, pixel_values, image_sizes):
        """AnyRes (see models/llava_next.py). pixel_values (N, P, H, W, 3) tiles of images in placeholder
        order, or (B, M, P, H, W, 3) M image slots per row (training); image_sizes (N, 2) / (B, M, 2)
        original (height, width) (concrete), or the (N, 5) / (B, M, 5) layouts of
        llava_next.layouts_from_sizes (traceable: what a jitted caller passes)."""
        cfg = self.config
        if pixel_values.ndim not in (5, 6):
            raise ValueError(f"AnyRes pixel_values must be (N, tiles, H, W, 3) or (B, slots, tiles, H, W, 3); "
                             f"got shape {pixel_values.shape}")
        if image_sizes is None:
            raise ValueError("AnyRes models need image_sizes: the original (height, width) of each image")
        concrete = _concrete(image_sizes)
        layouts = concrete if concrete is not None else image_sizes
        if layouts.shape[-1] == 2:
            if concrete is None:
                raise ValueError("image_sizes given as (height, width) must be concrete; under jit pass the layouts "
                                 "of llava_jax.models.llava_next.layouts_from_sizes instead")
            layouts = llava_next.layouts_from_sizes(concrete, cfg)
            concrete = layouts
        if layouts.shape[:-1] != pixel_values.shape[:-4]:
            raise ValueError(f"image_sizes {tuple(layouts.shape)} do not match pixel_values {pixel_values.shape}: "
                             f"one (height, width) per image")
        p, side = pixel_values.shape[-4], cfg.vision.image_size // cfg.vision.patch_size
        is_image = input_ids == cfg.image_token_id
        ids = _concrete(input_ids)
        if concrete is not None and ids is not None:
            if pixel_values.ndim == 5:
                llava_next.check_layouts(concrete, p, side, int((ids == cfg.image_token_id).sum()))
            else:
                for row, count in enumerate((ids == cfg.image_token_id).sum(axis=1)):
                    llava_next.check_layouts(concrete[row], p, side, int(count), f" in row {row}")
        tiles = pixel_values.reshape(-1, *pixel_values.shape[-3:])
        feats = self.image_features(tiles).reshape(*pixel_values.shape[:-3], side * side, -1)
        newline = self.projector.image_newline[...]
        if pixel_values.ndim == 5:
            feats = L.constrain_act(feats, (None, None, None, "act_embed"))
            gathered = llava_next.gather_features(feats, newline, layouts, is_image, side)
        else:
            feats = L.constrain_act(feats, ("act_batch", None, None, None, "act_embed"))
            gathered = llava_next.gather_features_per_row(feats, newline, layouts, is_image, side)
        return L.constrain_act(jnp.where(is_image[..., None], gathered.astype(embeds.dtype), embeds))

    def _check_counts(self, placeholders: int, images: int, where: str):
        t = self.config.num_image_tokens
        if placeholders % t or placeholders > images * t:
            raise ValueError(
                f"image placeholder count mismatch{where}: input_ids hold {placeholders} placeholder tokens "
                f"(image_token_id={self.config.image_token_id}) but pixel_values give {images} images x {t} "
                f"tokens = {images * t} image features; placeholders must be a whole number of images "
                f"and no more than the features")

    # ----- language -----------------------------------------------------------------------------
    def _inputs(self, input_ids, pixel_values, attention_mask, segment_ids, positions, cache, image_sizes=None):
        input_ids = jnp.asarray(input_ids)
        segment_ids = default_segment_ids(input_ids, attention_mask, segment_ids)
        if positions is None:
            if cache is not None:
                raise ValueError("positions must be passed explicitly when a KV cache is used")
            positions = default_positions(segment_ids)
        embeds = self.language_model.embed(input_ids)
        if pixel_values is not None:
            embeds = self._splice_images(input_ids, embeds, jnp.asarray(pixel_values), image_sizes)
        return embeds, segment_ids, jnp.asarray(positions, jnp.int32)

    def hidden_states(self, input_ids, pixel_values=None, attention_mask=None, *, segment_ids=None,
                      positions=None, cache=None, image_sizes=None):
        """Final-normed hidden states (B, S, D) in the compute dtype; with `cache`, (hidden, new_cache)
        (generation's prefill computes logits only where it samples)."""
        embeds, segment_ids, positions = self._inputs(input_ids, pixel_values, attention_mask, segment_ids,
                                                      positions, cache, image_sizes)
        h, new_cache = self.language_model.decode(embeds, segment_ids, positions, cache)
        return h if cache is None else (h, new_cache)

    def logits_from_hidden(self, h):
        return self.language_model.logits(h)

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> dict:
        return self.language_model.init_cache(batch_size, max_length, dtype)

    def __call__(self, input_ids, pixel_values=None, attention_mask=None, *, segment_ids=None, positions=None,
                 cache=None, image_sizes=None):
        embeds, segment_ids, positions = self._inputs(input_ids, pixel_values, attention_mask, segment_ids,
                                                      positions, cache, image_sizes)
        h, new_cache = self.language_model.decode(embeds, segment_ids, positions, cache)
        logits = self.language_model.logits(h)
        return logits if cache is None else (logits, new_cache)


def with_layout(model: LlavaModel, layout: layout_lib.DecoderLayout, *, merge_adapters: bool = False) -> LlavaModel:
    """A new model built in `layout` (`models.layout`) holding `model`'s parameters converted to it
    (`layout.convert_params`, a pure function of the parameter dict); `model` is left as it is and
    shares with the new one every array no conversion touches. Nothing is initialised: the new
    model is built abstractly, then filled. merge_adapters: a LoRA model's adapters are merged into
    its kernels first (`lora.merged_params`) and the new model is a plain one."""
    params = nnx.to_pure_dict(nnx.state(model))
    lora = model.language_model.lora
    if merge_adapters and lora is not None:
        params, lora = lora_lib.merged_params(params, lora), None
    params = layout_lib.convert_params(params, model.config.text, model.language_model.layout, layout)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LlavaModel(model.config, rngs=nnx.Rngs(0), lora=lora,
                                                                   layout=layout)))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
