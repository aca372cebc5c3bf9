"""The work of the convert/ scripts: a llava-jax model folder from HF folders, and back.

- `import_hf`: a llava-hf folder, or CLIP + LLaMA/Vicuna folders (+ an original projector) -> a model
  folder (config.json, tokenizer files, params/), as `convert/hf_to_orbax.py` writes it;
- `export_hf`: a model folder or training workdir -> a llava-hf folder (`convert/orbax_to_hf.py`);
- `export_peft`: a LoRA training workdir's adapter -> a peft folder (`convert/orbax_to_hf.py --peft`).

(`convert/gguf_to_hf.py` is llava_jax.hf.gguf.convert.)
"""
from __future__ import annotations

from llava_jax import checkpoint, peft_io, validate
from llava_jax.data.anyres import DEFAULT_GRID_PINPOINTS
from llava_jax.hf import weights
from llava_jax.hf.configs import to_hf


def check_inputs(hf_llava: str | None, clip: str | None, llm: str | None, projector: str | None,
                 projector_type: str | None, tokenizer: str | None) -> None:
    """The options go together and every input is a local folder (the projector: a file); raises a
    UserError (a hub id gets the hint to download it) before anything is read."""
    if hf_llava and (clip or llm or projector or projector_type):
        raise validate.UsageError("--hf-llava cannot be combined with --clip/--llm/--projector/--projector-type")
    if not hf_llava and not (clip and llm):
        raise validate.UsageError("give either --hf-llava DIR, or both --clip DIR and --llm DIR")
    for path, what in ((hf_llava, "llava-hf folder (--hf-llava)"), (clip, "CLIP folder (--clip)"),
                       (llm, "LLaMA/Vicuna folder (--llm)"), (tokenizer, "tokenizer folder (--tokenizer)")):
        if path:
            validate.require_folder(path, what)
    if projector:
        validate.require_file(projector, "projector weights file (--projector)", "DIR/mm_projector.bin")


def import_hf(out: str, hf_llava: str | None = None, clip: str | None = None, llm: str | None = None,
              projector: str | None = None, projector_type: str | None = None, image_token_id: int | None = None,
              tokenizer: str | None = None, seed: int = 0, progress: bool = True, anyres: bool = False):
    """Write the model folder `out`; returns its LlavaConfig."""
    check_inputs(hf_llava, clip, llm, projector, projector_type, tokenizer)
    if anyres and hf_llava:
        raise validate.UsageError("--anyres goes with --clip/--llm; a llava-hf folder's config.json says "
                                  "whether it is LLaVA-1.6 (model_type llava_next)")
    if hf_llava:
        config, params = weights.load_hf_llava(hf_llava, progress=progress)
        if image_token_id is not None:
            config = config.replace(image_token_id=image_token_id)
        tokenizer = tokenizer or hf_llava
    else:
        pinpoints = [list(p) for p in DEFAULT_GRID_PINPOINTS] if anyres else None
        config, params = weights.load_clip_llm(clip, llm, projector=projector, projector_type=projector_type,
                                               image_token_id=image_token_id, seed=seed, progress=progress,
                                               image_grid_pinpoints=pinpoints)
        tokenizer = tokenizer or llm
    checkpoint.save_model(out, params, config, tokenizer_dir=tokenizer)
    return config


def export_hf(ckpt: str, out: str, dtype: str = "float32", max_shard_bytes: int = 5 * 2**30,
              progress: bool = True) -> list:
    """Write the llava-hf folder `out`; returns the weight file names."""
    config = checkpoint.read_config(ckpt)
    to_hf(config)  # fail on an unsupported projector before reading any weights
    if peft_io.read_run_file(ckpt) is not None:  # a LoRA run: merged into the base it trained on
        config, params = peft_io.merged_numpy(None, ckpt)
    else:
        params = checkpoint.load_params_numpy(ckpt, config)
    names = weights.write_hf_llava(params, config, out, dtype=dtype, max_shard_bytes=max_shard_bytes,
                                   progress=progress)
    checkpoint.copy_tokenizer_files(checkpoint.model_root(ckpt), out)
    return names


def export_peft(ckpt: str, out: str) -> list:
    """Write a LoRA training workdir's adapter (and projector) as a peft folder; -> file names."""
    lora, params, base = peft_io.read_run_adapter(ckpt)
    return peft_io.write_peft(out, params, checkpoint.read_config(ckpt), lora, base_model=base or None)
