"""Model folders: config.json, tokenizer files and parameters (Orbax, imported inside the functions
that read or write arrays, so importing this module does not load orbax).

A model folder:       config.json (our LlavaConfig JSON), tokenizer files, params/ (Orbax PyTree of
                      the parameters as a nested dict, `nnx.to_pure_dict(nnx.state(model, nnx.Param))`).
A training workdir:   the same config.json + tokenizer files at its root, and checkpoints/<step>/
                      holding the item `params` (same nested dict, saved with ocp.args.StandardSave)
                      next to the optimizer state, the step and the data-iterator state; the train
                      loop writes and resumes those with llava_jax.train.checkpointer.TrainCheckpointer.
`load_pretrained(path)` accepts both (a workdir gives its latest step), and a step folder itself.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.keypaths import dotted
from llava_jax.models.config import LlavaConfig, config_from_any
from llava_jax.validate import NotAFolder, UserError, missing_folder_message


class NotACheckpoint(UserError, ValueError):
    """A folder that exists but is not a llava-jax model folder (e.g. a transformers folder)."""


class _NoItemMetadataWarning(logging.Filter):
    """Orbax warns `Metadata file does not exist: .../_CHECKPOINT_METADATA` whenever a params folder
    is read on its own (the file is written for the step folder, never for an item inside it, nor by
    StandardCheckpointer for a model folder's params/). The load is complete; drop the warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Metadata file does not exist")


logging.getLogger("absl").addFilter(_NoItemMetadataWarning())

CONFIG_FILE = "config.json"
PARAMS_ITEM = "params"
CHECKPOINTS_DIR = "checkpoints"

# Files a tokenizer/processor leaves in a folder; copied alongside the weights.
TOKENIZER_FILE_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                           "merges.txt", "chat_template.*", "preprocessor_config.json",
                           "processor_config.json")


# ----- model folder: config and tokenizer files -----------------------------------------------

def write_config(path: str, config) -> None:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        f.write(config_from_any(config).to_json())


def read_config(path: str) -> LlavaConfig:
    """The LlavaConfig of a model folder, training workdir or workdir step folder."""
    root = model_root(path)
    file = os.path.join(root, CONFIG_FILE)
    with open(file) as f:
        d = json.load(f)
    if "model_type" in d:
        raise NotACheckpoint(f"{file} is a transformers config ({d['model_type']!r}), not a llava-jax model "
                             f"folder; convert the folder with convert/hf_to_orbax.py first (--hf-llava {root} --out DIR)")
    try:
        return LlavaConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: not a llava-jax model config: {e}") from e


def tokenizer_files(folder: str) -> list:
    found = set()
    for pattern in TOKENIZER_FILE_PATTERNS:
        found.update(p for p in glob.glob(os.path.join(folder, pattern)) if os.path.isfile(p))
    return sorted(found)


def copy_tokenizer_files(src: str, dst: str) -> list:
    """Copy tokenizer/processor files from folder `src` to `dst`; returns the names copied."""
    os.makedirs(dst, exist_ok=True)
    names = []
    for file in tokenizer_files(src):
        shutil.copy2(file, os.path.join(dst, os.path.basename(file)))
        names.append(os.path.basename(file))
    return names


def write_model_files(path: str, config, tokenizer=None, tokenizer_dir: Optional[str] = None) -> None:
    """config.json and the tokenizer files (from a tokenizer object or a folder) into `path`.

    Also what a training workdir holds at its root."""
    write_config(path, config)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    elif tokenizer_dir:
        copy_tokenizer_files(tokenizer_dir, path)


def load_tokenizer(path: str):
    """The transformers tokenizer saved in a model folder or workdir (AutoTokenizer)."""
    from transformers import AutoTokenizer

    root = model_root(path)
    if not tokenizer_files(root):
        raise NotAFolder(f"no tokenizer files in {root} (expected e.g. tokenizer.json or tokenizer.model)")
    return AutoTokenizer.from_pretrained(root)


# ----- parameters ----------------------------------------------------------------------------

def params_dict(state_or_model) -> dict:
    """Nested dict of parameter arrays from a model, an nnx.State or a nested dict."""
    if isinstance(state_or_model, nnx.Module):
        return nnx.to_pure_dict(nnx.state(state_or_model, nnx.Param))
    if isinstance(state_or_model, nnx.State):
        return nnx.to_pure_dict(state_or_model)
    if isinstance(state_or_model, dict):
        return state_or_model
    raise TypeError(f"expected an nnx Module, nnx.State or nested dict of parameters, "
                    f"got {type(state_or_model).__name__}")


def save_params(directory: str, params) -> None:
    """Write a nested dict of arrays (numpy or jax, sharded or not) as an Orbax PyTree; blocks."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory, params_dict(params), force=True)
        ckptr.wait_until_finished()


def stored_shapes(directory: str) -> dict:
    """{'a.b.c': (shape, dtype)} of an Orbax params folder, from its metadata (nothing is read)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(os.path.abspath(directory)).item_metadata.tree
    return {dotted(path): (tuple(leaf.shape), np.dtype(leaf.dtype))
            for path, leaf in jax.tree_util.tree_leaves_with_path(meta)}


def check_params_match(directory: str, target: dict) -> None:
    """Raise naming every missing/unexpected parameter and shape mismatch between stored and target."""
    stored = stored_shapes(directory)
    wanted = {dotted(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_leaves_with_path(target)}
    problems = []
    missing = sorted(set(wanted) - set(stored))
    unexpected = sorted(set(stored) - set(wanted))
    if missing:
        problems.append(f"missing parameters {missing}")
    if unexpected:
        problems.append(f"unexpected parameters {unexpected}")
    for name in sorted(set(wanted) & set(stored)):
        if stored[name][0] != wanted[name]:
            problems.append(f"shape mismatch for {name}: expected {wanted[name]}, found {stored[name][0]}")
    if problems:
        raise NotACheckpoint(f"checkpoint {directory} does not match the model config: " + "; ".join(problems))


def restore_params(directory: str, target: Optional[dict] = None) -> dict:
    """Read an Orbax params folder.

    target: nested dict of jax.ShapeDtypeStruct (dtype = the dtype to restore as; with `sharding`
    each array is read straight into its shards; without, as numpy). None: numpy, stored dtypes.
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    if target is not None:
        check_params_match(directory, target)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(directory, target)


def abstract_model(config: LlavaConfig):
    """LlavaModel with shape-only parameters (nothing allocated)."""
    from llava_jax.models.llava import LlavaModel

    return nnx.eval_shape(lambda: LlavaModel(config, rngs=nnx.Rngs(0)))


def params_target(config: LlavaConfig, mesh=None, dtype=np.float32, host: bool = False) -> dict:
    """Abstract parameter dict to restore into: on `mesh` by the logical-axis rules, else on device 0;
    with `host`, as numpy arrays in host memory."""
    from llava_jax import sharding

    abstract = nnx.state(abstract_model(config), nnx.Param)
    pure = nnx.to_pure_dict(abstract)
    if host:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype), pure)
    if mesh is not None:
        shardings = nnx.to_pure_dict(sharding.state_shardings(abstract, mesh))
    else:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, pure)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype, sharding=s), pure, shardings)


def model_from_params(config: LlavaConfig, params: dict):
    """A LlavaModel holding `params` (arrays are used as given, not copied)."""
    model = abstract_model(config)
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree_util.tree_leaves(rest):
        raise RuntimeError("LlavaModel holds non-parameter state that a checkpoint does not restore: "
                           f"{list(rest.flat_state())[:5]}")
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state, rest)


# ----- model folders and workdirs ------------------------------------------------------------

def save_model(path: str, state_or_model, config, tokenizer=None, tokenizer_dir: Optional[str] = None) -> None:
    """Write a model folder: config.json, tokenizer files, params/."""
    write_model_files(path, config, tokenizer=tokenizer, tokenizer_dir=tokenizer_dir)
    save_params(os.path.join(path, PARAMS_ITEM), state_or_model)


def latest_step(workdir: str) -> Optional[int]:
    """The highest finished step under workdir/checkpoints (one holding a params item), or None."""
    folder = os.path.join(workdir, CHECKPOINTS_DIR)
    if not os.path.isdir(folder):
        return None
    steps = [int(name) for name in os.listdir(folder)
             if name.isdigit() and os.path.isdir(os.path.join(folder, name, PARAMS_ITEM))]
    return max(steps) if steps else None


def model_root(path: str) -> str:
    """The folder holding config.json: the path itself, or the workdir above a step folder."""
    original, path = str(path), os.path.abspath(path)
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        return path
    parent = os.path.dirname(os.path.dirname(path))  # workdir/checkpoints/<step> -> workdir
    if os.path.basename(os.path.dirname(path)) == CHECKPOINTS_DIR and os.path.isfile(os.path.join(parent, CONFIG_FILE)):
        return parent
    if not os.path.exists(path):  # named as given: a hub id stays recognisable
        raise NotAFolder(missing_folder_message(original, "checkpoint (a llava-jax model folder or training workdir)"))
    raise NotAFolder(f"{path} is not a llava-jax model folder or training workdir: no {CONFIG_FILE}")


def params_location(path: str) -> str:
    """The Orbax params folder of a model folder, workdir (latest step) or step folder."""
    path = os.path.abspath(path)
    direct = os.path.join(path, PARAMS_ITEM)
    if os.path.isdir(direct):
        return direct
    step = latest_step(path)
    if step is None:
        raise NotAFolder(f"{path} holds no parameters: neither {PARAMS_ITEM}/ nor "
                         f"{CHECKPOINTS_DIR}/<step>/{PARAMS_ITEM}/ (a training run that has not saved a step yet?)")
    return os.path.join(path, CHECKPOINTS_DIR, str(step), PARAMS_ITEM)


def load_params_numpy(path: str, config: Optional[LlavaConfig] = None) -> dict:
    """The float32 parameters of a model folder / workdir / step folder as numpy (for export)."""
    config = config or read_config(path)
    return restore_params(params_location(path), params_target(config, host=True))


def load_pretrained(path: str, dtype: Optional[str] = None, mesh=None, param_dtype=None,
                    adapter: Optional[str] = None):
    """Load a model folder, a training workdir (its latest step) or a step folder -> (model, config).

    adapter: a peft adapter folder or LoRA training workdir merged into `path` (the base); a LoRA
      training workdir given as `path` is merged into the base it trained on (lora.json).

    dtype: compute dtype overriding the saved config's (e.g. 'bfloat16').
    mesh: a jax Mesh; parameters are read straight into their shards by the logical-axis rules
      (enter the mesh with jax.set_mesh when calling the model).
    param_dtype: the dtype parameters are restored as (default float32, the training dtype);
      'bfloat16' halves the memory for inference.
    """
    from llava_jax import peft_io

    if adapter is not None or peft_io.read_run_file(path) is not None:
        config, merged = peft_io.merged_numpy(path if adapter is not None else None, adapter or path)
    else:
        config, merged = read_config(path), None
    if dtype is not None:
        config = config.replace(dtype=jnp.dtype(dtype).name)
    target = params_target(config, mesh=mesh, dtype=jnp.dtype(param_dtype or jnp.float32))
    if merged is None:
        params = restore_params(params_location(path), target)
    else:
        params = jax.tree.map(lambda a, t: jax.device_put(np.asarray(a).astype(t.dtype), t.sharding), merged, target)
    return model_from_params(config, params), config


def restore_params_subset(path: str, target: dict, only: Optional[tuple] = None) -> dict:
    """Read the parameters a model folder / workdir / step folder holds for `target`'s leaves.

    target: nested dict of ShapeDtypeStruct with shardings (the whole model). `only`: top-level
    keys to take (e.g. ('projector',) from a stage-1 run). Returns the nested dict of what was read;
    leaves the checkpoint lacks (e.g. a projector not in a converted CLIP+Vicuna base) are absent.
    Shapes must match the target: a mismatch names the parameter and both shapes.
    """
    import orbax.checkpoint as ocp

    directory = params_location(path)
    stored = stored_shapes(directory)
    flat = {dotted(p): (p, leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(target)}
    wanted = {}
    for name, (p, leaf) in flat.items():
        if only is not None and name.split(".")[0] not in only:
            continue
        if name not in stored:
            continue
        if tuple(stored[name][0]) != tuple(leaf.shape):
            raise ValueError(f"checkpoint {directory}: parameter {name} has shape {stored[name][0]}, "
                             f"the model config expects {tuple(leaf.shape)}")
        wanted[name] = leaf
    if only is not None:
        missing = [n for n, _ in flat.items() if n.split(".")[0] in only and n not in stored]
        if missing:
            raise ValueError(f"checkpoint {directory} lacks parameters {missing[:8]} needed from it")
    if not wanted:
        return {}
    partial = {}
    for name, leaf in wanted.items():
        node = partial
        keys = name.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = leaf
    restore_args = ocp.checkpoint_utils.construct_restore_args(partial)
    with ocp.PyTreeCheckpointer() as ckptr:
        return ckptr.restore(directory, args=ocp.args.PyTreeRestore(item=partial, restore_args=restore_args,
                                                                    partial_restore=True))
