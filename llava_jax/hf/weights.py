"""Tensors between HF weight files and our parameter dict: load a llava-hf folder or CLIP + LLaMA
folders (+ an original projector), write a llava-hf folder. The table of parameters <-> canonical keys
is llava_jax.hf.keys; this module only moves tensors between files and that table, one at a time.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Optional

import jax
import numpy as np
from flax import nnx

from llava_jax.hf import keys
from llava_jax.hf.configs import clip_llm_config, hf_llava_config, to_hf
from llava_jax.hf.files import HFTensors, ShardedWriter
from llava_jax.models import layers as L
from llava_jax.models.projector import Projector

def check_against_table(tensors: HFTensors, table: list, what: str, optional: Iterable[str] = ()) -> None:
    """Raise ValueError listing every missing key, unexpected key and shape mismatch (from file
    headers, before anything is converted). Keys in `optional` may be present without being used."""
    expected = {key: entry.hf_shape for entry in table for key in entry.hf_keys}
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors.keys() if k not in expected and k not in set(optional)]
    problems = []
    if missing:
        problems.append(f"missing key(s) {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected key(s) {_few([f'{k} ({tensors.source(k)})' for k in unexpected])}")
    for key, shape in expected.items():
        if key in tensors and tuple(tensors.shape(key)) != tuple(shape):
            problems.append(f"shape mismatch for {key} ({tensors.source(key)}): expected {tuple(shape)}, "
                            f"found {tuple(tensors.shape(key))}")
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))


def _few(items: list, n: int = 8) -> str:
    shown = ", ".join(items[:n])
    return f"[{shown}{', ...' if len(items) > n else ''}] ({len(items)} in all)"


def params_from_tensors(tensors: HFTensors, table: list, progress: bool = True) -> dict:
    """Our nested float32 parameter dict, each stacked array filled layer by layer."""
    from tqdm import tqdm

    params: dict = {}
    total = sum(len(e.hf_keys) for e in table)
    with tqdm(total=total, desc="converting", unit="tensor", disable=not progress) as bar:
        for entry in table:
            out = np.empty(entry.shape, np.float32)
            if entry.stacked:
                for i, key in enumerate(entry.hf_keys):
                    one = dataclasses.replace(entry, hf_keys=(key,), stacked=False)
                    out[i] = one.to_ours([tensors.get(key)])
                    bar.update()
            else:
                out[...] = entry.to_ours([tensors.get(entry.hf_keys[0])])
                bar.update()
            node = params
            for p in entry.path[:-1]:
                node = node.setdefault(p, {})
            node[entry.path[-1]] = out
    return params


def _tied_head(config) -> tuple:
    # a tied model has no lm_head parameter; a file may still carry the (identical) tensor
    return ("language_model.lm_head.weight",) if config.text.tie_word_embeddings else ()


def load_hf_llava(folder: str, progress: bool = True):
    """A llava-hf folder (single or sharded safetensors or .bin, any key layout) -> (config, params)."""
    config = hf_llava_config(folder)
    tensors = HFTensors([folder])
    table = keys.entries(config)
    check_against_table(tensors, table, f"llava-hf weights in {folder}", optional=_tied_head(config))
    return config, params_from_tensors(tensors, table, progress)


def load_clip_llm(clip_dir: str, llm_dir: str, projector: Optional[str] = None,
                  projector_type: Optional[str] = None, image_token_id: Optional[int] = None,
                  seed: int = 0, progress: bool = True, image_grid_pinpoints=None):
    """CLIP folder + LLaMA/Vicuna folder (+ an original mm_projector.bin/.safetensors) -> (config, params).

    The projector comes from `projector`, else from the LLM folder when it holds
    model.mm_projector.* (an original LLaVA checkpoint), else it is freshly initialised (stage 1)."""
    config = clip_llm_config(clip_dir, llm_dir, projector_type, image_token_id,
                             image_grid_pinpoints=image_grid_pinpoints)
    vision = HFTensors([clip_dir])
    table = keys.entries(config, ["vision_tower"])
    check_against_table(vision, table, f"CLIP weights in {clip_dir}")
    params = params_from_tensors(vision, table, progress)

    llm = HFTensors([llm_dir])
    projector_keys = [k for k in llm.keys() if k.startswith("multi_modal_projector.") or k == "image_newline"]
    table = keys.entries(config, ["language_model"])
    check_against_table(llm, table, f"LLaMA weights in {llm_dir}", optional=projector_keys + list(_tied_head(config)))
    params.update(params_from_tensors(llm, table, progress))

    table = keys.entries(config, ["projector"])
    if projector is not None or projector_keys:
        source = HFTensors([projector]) if projector is not None else llm
        fresh_newline = config.anyres and "image_newline" not in source
        if fresh_newline:  # a stage-1 mm_projector.bin holds no image_newline: it starts fresh
            table = [e for e in table if e.hf_keys != ("image_newline",)]
        what = f"projector weights in {projector or llm_dir} (type {config.projector_type})"
        others = [] if projector is not None else [k for k in llm.keys() if k not in projector_keys]
        check_against_table(source, table, what, optional=others)
        params.update(params_from_tensors(source, table, progress))
        if fresh_newline:
            params["projector"]["image_newline"] = fresh_projector(config, seed)["image_newline"]
    else:
        params["projector"] = fresh_projector(config, seed)
    return config, params


def fresh_projector(config, seed: int = 0) -> dict:
    """The projector's parameters as LlavaModel initialises them (the start of stage 1)."""
    rngs = nnx.Rngs(seed)
    module = Projector(config.projector_type, config.vision_feature_dim, config.text.hidden_size,
                       dtype=config.dtype, rngs=rngs)
    if config.anyres:  # as LlavaModel builds it (models/llava.py)
        d = config.text.hidden_size
        module.image_newline = L.param(rngs, L.normal_init(d ** -0.5), (d,), ("embed",))
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module, nnx.Param)))


def pad_vocab(params: dict, config, size: int):
    """Grow the vocabulary to `size` rows: llava-hf keeps <image> (and its pad) inside the embedding
    table, while the original 32000-token LLaMA vocabulary puts the placeholder just past it.
    New embedding and lm_head rows are the mean of the existing ones (as llava-hf's conversion did),
    so their logits are ordinary rather than dominant. Returns (params, config); the input is kept."""
    vocab = config.text.vocab_size
    if size < vocab:
        raise ValueError(f"cannot pad the vocabulary from {vocab} down to {size}")
    lm = dict(params["language_model"])
    embed = np.asarray(lm["embed_tokens"]["embedding"])
    lm["embed_tokens"] = {"embedding": np.concatenate(
        [embed, np.broadcast_to(embed.mean(0, keepdims=True), (size - vocab, embed.shape[1]))])}
    if "lm_head" in lm:
        head = np.asarray(lm["lm_head"]["kernel"])
        lm["lm_head"] = {"kernel": np.concatenate(
            [head, np.broadcast_to(head.mean(1, keepdims=True), (head.shape[0], size - vocab))], axis=1)}
    config = config.replace(text=dataclasses.replace(config.text, vocab_size=size))
    return {**params, "language_model": lm}, config


def write_hf_llava(params: dict, config, out: str, dtype: str = "float32",
                   max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> list:
    """Write our parameters as a llava-hf folder (safetensors, sharded with an index when larger
    than max_shard_bytes, and config.json) that LlavaForConditionalGeneration.from_pretrained loads
    (LlavaNextForConditionalGeneration for an AnyRes config).

    A placeholder id past the vocabulary (the original-code configs) is brought inside it by padding
    the vocabulary to the next multiple of 64 (32000 -> 32064, llava-hf's size).
    Returns the weight file names."""
    import ml_dtypes
    from tqdm import tqdm

    hf_config = to_hf(config)  # ValueError for projectors llava-hf does not have
    np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}.get(dtype)
    if np_dtype is None:
        raise ValueError(f"unknown dtype {dtype!r}; expected float32, float16 or bfloat16")
    params = jax.tree.map(np.asarray, params)
    needed = max(config.image_token_id, config.pad_token_id) + 1
    if needed > config.text.vocab_size:
        params, config = pad_vocab(params, config, -(-needed // 64) * 64)
        hf_config = to_hf(config)
    hf_config["dtype"] = dtype
    writer = ShardedWriter(out, max_shard_bytes)
    table = keys.entries(config)
    with tqdm(total=sum(len(e.hf_keys) for e in table), desc="exporting", unit="tensor", disable=not progress) as bar:
        for key, tensor in keys.hf_from_state(params, config):
            writer.add(key, tensor.astype(np_dtype, copy=False))
            bar.update()
    names = writer.close()
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    return names
