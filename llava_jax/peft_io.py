"""LoRA adapters in and out: the peft folder format, the reference's LoRA checkpoints, merging.

Formats
- peft folder: adapter_config.json + adapter_model.safetensors with peft's key names for
  transformers' LlavaForConditionalGeneration (`base_model.model.model.language_model.layers.N.
  self_attn.q_proj.lora_A.weight`, A (r, in), B (out, r)); a trained projector is a peft
  `modules_to_save` entry (`base_model.model.model.multi_modal_projector.linear_1.weight`).
  `PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(hf_dir), folder)` loads
  it onto the model `convert/orbax_to_hf.py` exports.
- the reference's LoRA checkpoint (scripts/v1_5/finetune_lora.sh): a peft adapter on
  LlavaLlamaForCausalLM (`base_model.model.model.layers.N...`, adapter_model.bin or .safetensors)
  plus non_lora_trainables.bin with the projector (`base_model.model.model.mm_projector.{0,2}.*`).
  Older llava-hf layouts (`language_model.model.layers.N...`) read as well.
- a LoRA training workdir: its checkpoints hold the adapters and the projector only; lora.json
  names the LoraConfig and the base model folder they train on.

`merged_numpy(base, adapter)` gives a plain model's float32 parameters (W + A @ B * alpha / r);
`llava-jax merge` writes them as a model folder whose logits equal the unmerged model's.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from typing import Optional

import numpy as np

from llava_jax.models import lora as lora_lib
from llava_jax.validate import UserError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
NON_LORA_FILE = "non_lora_trainables.bin"
RUN_FILE = "lora.json"  # in a LoRA training workdir

PEFT_PREFIX = "base_model.model.model."  # peft's wrapper + LlavaForConditionalGeneration.model
_PROJ = {t: attr for t, (_, attr) in lora_lib.TARGETS.items()}
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?:[\w.]*?\.)?layers\.(\d+)\.(self_attn|mlp)\."
                       r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.lora_([AB])(?:\.default)?\.weight$")
_PROJECTOR_KEY = re.compile(r"(?:multi_modal_projector(?:\.modules_to_save\.default)?\.linear_(\d+)|"
                            r"mm_projector\.(\d+)|mm_projector)\.(weight|bias)$")


class AdapterError(UserError, ValueError):
    """An adapter that does not fit the model: names the file and the key or module."""


# ----- export ---------------------------------------------------------------------------------

def target_regex(lora) -> str:
    """peft target_modules matching the language model's adapted projections only (a list of
    names would also match the CLIP tower's q/k/v_proj)."""
    return r".*language_model.*\.(" + "|".join(_PROJ[t] for t in lora.targets) + ")"


def peft_tensors(params: dict, config, lora) -> dict:
    """{peft key: numpy (PyTorch layout)} from a parameter dict holding the adapters (and the
    projector, exported when lora.train_projector)."""
    out = {}
    layers = params["language_model"]["layers"]
    for target in lora.targets:
        parent, attr = lora_lib.TARGETS[target]
        module = layers[parent][attr]
        a, b = np.asarray(module["lora_a"], np.float32), np.asarray(module["lora_b"], np.float32)
        for i in range(a.shape[0]):
            stem = f"{PEFT_PREFIX}language_model.layers.{i}.{parent}.{attr}"
            out[f"{stem}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            out[f"{stem}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    if lora.train_projector and "projector" in params:
        for name, leaves in params["projector"].items():
            stem = f"{PEFT_PREFIX}multi_modal_projector.{name}"
            out[f"{stem}.weight"] = np.ascontiguousarray(np.asarray(leaves["kernel"], np.float32).T)
            if "bias" in leaves:
                out[f"{stem}.bias"] = np.asarray(leaves["bias"], np.float32)
    return out


def peft_config(lora, base_model: Optional[str] = None) -> dict:
    """adapter_config.json (peft fills every field not given with its default)."""
    return dict(peft_type="LORA", task_type=None, r=int(lora.rank), lora_alpha=float(lora.alpha),
                lora_dropout=float(lora.dropout), target_modules=target_regex(lora), bias="none",
                fan_in_fan_out=False, use_rslora=False, use_dora=False, init_lora_weights=True,
                inference_mode=True, base_model_name_or_path=base_model,
                modules_to_save=["multi_modal_projector"] if lora.train_projector else None)


def write_peft(folder: str, params: dict, config, lora, base_model: Optional[str] = None) -> list:
    """Write a peft adapter folder; -> the file names."""
    from llava_jax.hf.files import save_safetensors

    os.makedirs(folder, exist_ok=True)
    save_safetensors(peft_tensors(params, config, lora), os.path.join(folder, ADAPTER_FILES[0]))
    with open(os.path.join(folder, ADAPTER_CONFIG), "w") as f:
        json.dump(peft_config(lora, base_model), f, indent=2)
    return [ADAPTER_CONFIG, ADAPTER_FILES[0]]


# ----- import ---------------------------------------------------------------------------------

def _read_tensors(path: str) -> dict:
    from llava_jax.hf.files import open_weight_file

    f = open_weight_file(path)
    return {k: np.asarray(f.get(k), np.float32) for k in f.keys()}


def read_peft(folder: str, config) -> tuple:
    """A peft adapter folder (ours or the reference's) -> (LoraConfig, params dict with lora_a /
    lora_b per adapted projection and the projector when the folder has one)."""
    cfg_file = os.path.join(folder, ADAPTER_CONFIG)
    if not os.path.isfile(cfg_file):
        raise AdapterError(f"{folder} is not a peft adapter folder: no {ADAPTER_CONFIG}")
    with open(cfg_file) as f:
        pc = json.load(f)
    if pc.get("peft_type", "LORA") != "LORA" or pc.get("use_dora") or pc.get("use_rslora"):
        raise AdapterError(f"{cfg_file}: only plain LoRA adapters are supported (peft_type LORA, no DoRA, "
                           f"no rsLoRA); got peft_type={pc.get('peft_type')!r} use_dora={pc.get('use_dora')} "
                           f"use_rslora={pc.get('use_rslora')}")
    if pc.get("rank_pattern") or pc.get("alpha_pattern"):
        raise AdapterError(f"{cfg_file}: per-module rank_pattern / alpha_pattern is not supported")
    weights = next((os.path.join(folder, n) for n in ADAPTER_FILES if os.path.isfile(os.path.join(folder, n))), None)
    if weights is None:
        raise AdapterError(f"{folder} has no adapter weights ({' or '.join(ADAPTER_FILES)})")
    tensors = _read_tensors(weights)
    sources = {k: weights for k in tensors}
    extra = os.path.join(folder, NON_LORA_FILE)
    if os.path.isfile(extra):
        more = _read_tensors(extra)
        tensors.update(more)
        sources.update({k: extra for k in more})
    return _params_from_tensors(tensors, sources, pc, config)


def _params_from_tensors(tensors: dict, sources: dict, pc: dict, config) -> tuple:
    t = config.text
    found: dict = {}
    projector: dict = {}
    for key, value in tensors.items():
        m = _LORA_KEY.match(key)
        if m:
            layer, parent, attr, ab = int(m.group(1)), m.group(2), m.group(3), m.group(4)
            if layer >= t.num_layers:
                raise AdapterError(f"{sources[key]}: key {key} is for layer {layer}, the model has {t.num_layers}")
            found.setdefault(attr, {}).setdefault(ab, {})[layer] = value
            continue
        m = _PROJECTOR_KEY.search(key)
        if m and "projector" in key:
            index = m.group(1) or (str(int(m.group(2)) // 2 + 1) if m.group(2) else "1")
            leaf = "kernel" if m.group(3) == "weight" else "bias"
            projector.setdefault(f"linear_{index}", {})[leaf] = value.T if leaf == "kernel" else value
            continue
        raise AdapterError(f"{sources[key]}: unknown key {key!r} (expected LoRA A/B weights of the language "
                           f"model's q/k/v/o/gate/up/down_proj or projector weights)")
    by_attr = {attr: tgt for tgt, attr in _PROJ.items()}
    targets = tuple(tgt for tgt in lora_lib.ALL_TARGETS if _PROJ[tgt] in found)
    if not targets:
        raise AdapterError("the adapter holds no LoRA weights of the language model's projections")
    rank = int(pc.get("r", 0)) or next(iter(next(iter(found.values()))["A"].values())).shape[0]
    lora = lora_lib.LoraConfig(rank=rank, alpha=float(pc.get("lora_alpha", rank)),
                               dropout=float(pc.get("lora_dropout", 0.0)), targets=targets,
                               train_projector=bool(projector))
    layers: dict = {}
    for attr, ab in found.items():
        target = by_attr[attr]
        din, dout = lora_lib.projection_shape(t, target)
        stacks = {}
        for which, want in (("A", (rank, din)), ("B", (dout, rank))):
            per_layer = ab.get(which, {})
            missing = sorted(set(range(t.num_layers)) - set(per_layer))
            if missing:
                raise AdapterError(f"adapter lacks lora_{which} of {attr} for layers {missing}")
            for i, w in per_layer.items():
                if w.shape != want:
                    raise AdapterError(f"adapter {attr}.lora_{which} of layer {i} has shape {w.shape}; the base "
                                       f"model's {attr} ({din} -> {dout}) with rank {rank} needs {want}")
            stacks[which] = np.stack([per_layer[i].T for i in range(t.num_layers)])
        parent = lora_lib.TARGETS[target][0]
        layers.setdefault(parent, {})[attr] = {"lora_a": stacks["A"], "lora_b": stacks["B"]}
    params = {"language_model": {"layers": layers}}
    if projector:
        _check_projector(projector, config)
        params["projector"] = projector
    return lora, params


def _check_projector(projector: dict, config) -> None:
    from llava_jax.models.projector import projector_depth

    depth = projector_depth(config.projector_type)
    names = sorted(projector)
    if names != [f"linear_{i}" for i in range(1, depth + 1)]:
        raise AdapterError(f"adapter projector has layers {names}; the model's {config.projector_type} projector "
                           f"has {[f'linear_{i}' for i in range(1, depth + 1)]}")
    for i in range(1, depth + 1):
        din = config.vision_feature_dim if i == 1 else config.text.hidden_size
        want = (din, config.text.hidden_size)
        got = projector[f"linear_{i}"].get("kernel")
        if got is None or got.shape != want:
            raise AdapterError(f"adapter projector linear_{i} weight has shape "
                               f"{None if got is None else got.shape[::-1]}, the model needs {want[::-1]}")


# ----- training workdirs ---------------------------------------------------------------------

def write_run_file(workdir: str, lora, base: str) -> None:
    with open(os.path.join(workdir, RUN_FILE), "w") as f:
        json.dump({"lora": lora.to_dict(), "base": os.path.abspath(base) if base else ""}, f, indent=2)


def read_run_file(path: str) -> Optional[dict]:
    """lora.json of a LoRA training workdir (or step folder inside one); None for anything else."""
    from llava_jax import checkpoint

    try:
        root = checkpoint.model_root(path)
    except UserError:
        return None
    file = os.path.join(root, RUN_FILE)
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        d = json.load(f)
    return dict(d, lora=lora_lib.LoraConfig(**dict(d["lora"], targets=tuple(d["lora"]["targets"]))), root=root)


def read_run_adapter(path: str) -> tuple:
    """(LoraConfig, adapters + projector as numpy, base folder) of a LoRA workdir's latest (or given) step."""
    from llava_jax import checkpoint

    run = read_run_file(path)
    if run is None:
        raise AdapterError(f"{path} is not a LoRA training workdir (no {RUN_FILE})")
    params = checkpoint.restore_params(checkpoint.params_location(path))
    params = {k: v for k, v in params.items() if k in ("language_model", "projector")}
    return run["lora"], params, run["base"]


def read_adapter(path: str, config) -> tuple:
    """(LoraConfig, adapter params, base folder or None) from a peft folder or a LoRA workdir."""
    if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
        lora, params = read_peft(path, config)
        return lora, params, None
    if read_run_file(path) is not None:
        return read_run_adapter(path)
    raise AdapterError(f"--adapter {path}: neither a peft adapter folder ({ADAPTER_CONFIG}) nor a LoRA "
                       f"training workdir ({RUN_FILE})")


# ----- merge ----------------------------------------------------------------------------------

def merge_into(base: dict, adapter: dict, lora) -> dict:
    """Plain float32 parameters: base kernels plus A @ B * alpha / r, the adapter's projector
    replacing the base's when it has one."""
    import jax

    full = jax.tree.map(lambda x: x, base)
    layers = dict(full["language_model"]["layers"])
    full["language_model"] = dict(full["language_model"], layers=layers)
    for parent, modules in adapter["language_model"]["layers"].items():
        layers[parent] = dict(layers[parent])
        for attr, ab in modules.items():
            module = dict(layers[parent][attr])
            kernel = np.asarray(module["kernel"], np.float32)
            a, b = np.asarray(ab["lora_a"], np.float32), np.asarray(ab["lora_b"], np.float32)
            if a.shape[:2] != kernel.shape[:2] or b.shape[::2] != (kernel.shape[0], kernel.shape[2]):
                raise AdapterError(f"adapter {parent}.{attr} ({a.shape} x {b.shape}) does not fit the base kernel "
                                   f"{kernel.shape}")
            module["kernel"] = kernel + np.einsum("lir,lro->lio", a, b) * np.float32(lora.scaling)
            layers[parent][attr] = module
    if "projector" in adapter:
        full["projector"] = adapter["projector"]
    return full


def merged_numpy(base_path: Optional[str], adapter_path: str, config=None) -> tuple:
    """(config, plain float32 numpy parameters) of base + adapter; a LoRA workdir's own base is used
    when base_path is None."""
    from llava_jax import checkpoint

    lora, adapter, run_base = read_adapter(adapter_path, config or _config_near(base_path, adapter_path))
    base_path = base_path or run_base
    if not base_path:
        raise AdapterError(f"{adapter_path}: give the base model (--ckpt BASE) the adapter was trained on")
    config = config or checkpoint.read_config(base_path)
    base = checkpoint.load_params_numpy(base_path, config)
    return config, merge_into(base, adapter, lora)


def _config_near(base_path, adapter_path):
    from llava_jax import checkpoint

    if base_path:
        return checkpoint.read_config(base_path)
    run = read_run_file(adapter_path)
    if run is None:
        raise AdapterError(f"{adapter_path}: give the base model (--ckpt BASE) the adapter applies to")
    return checkpoint.read_config(run["root"])


def main(argv=None) -> int:
    """`llava-jax merge --adapter ADAPTER [--ckpt BASE] --out DIR`: a plain model folder."""
    from llava_jax import checkpoint

    p = argparse.ArgumentParser(prog="llava-jax merge", description=main.__doc__)
    p.add_argument("--adapter", required=True, help="a LoRA training workdir or a peft adapter folder "
                   "(ours or the reference's, with non_lora_trainables.bin)")
    p.add_argument("--ckpt", help="the base model folder (default: the one a LoRA workdir trained on)")
    p.add_argument("--out", required=True, help="output model folder")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    config, params = merged_numpy(args.ckpt, args.adapter)
    run = read_run_file(args.adapter)
    # Tokenizer: the base's, else the LoRA run's (a training workdir keeps the one it trained with).
    sources = [checkpoint.model_root(d) for d in (args.ckpt, run and run["base"], run and run["root"]) if d]
    tokenizer_dir = next((d for d in sources if checkpoint.tokenizer_files(d)), None)
    checkpoint.save_model(args.out, params, config, tokenizer_dir=tokenizer_dir)
    if run and os.path.isfile(os.path.join(run["root"], "inference.json")):  # the run's prompt template
        shutil.copyfile(os.path.join(run["root"], "inference.json"), os.path.join(args.out, "inference.json"))
    print(f"wrote {args.out}: merged {args.adapter} into {args.ckpt or run['base']}")
    return 0
