"""Checks of a training config against the machine, run before anything is built or compiled.

`check_train(config, num_devices)` is called by `llava-jax train`, `llava-jax aot` and
`launch/tpu.py train`. It looks at everything that would otherwise fail deep inside JAX, Grain or
Orbax (or, worse, run wrongly): the mesh against the device count, the global batch and the
microbatch against the data-parallel size (data x fsdp), every parameter dimension against the mesh
axes it is split over, max_length against the image tokens of a row, the stage against
the init checkpoints, the template name and (`check_tokenizer`) the tokenizer against the vocabulary.
All problems are reported together in one ConfigError whose message says what to set, with a
suggestion checked against the same rules for this device count (a mesh, a batch, a length).

A global batch smaller than the number of devices is refused at start: every batch row lives on one
data-parallel shard, so data x fsdp must divide the batch. The suggestion is a mesh that moves the
remaining devices to the tensor axis (when the model's dimensions allow it) or the smallest batch
that fills the devices.

UserError is the type of every mistake a user can fix from the command line; `llava-jax` prints its
message on one line and exits with status 2 (a traceback only with --debug or LLAVA_JAX_DEBUG=1).
"""
from __future__ import annotations

import difflib
import itertools
import math
import os
import re
from typing import Optional, Sequence

from llava_jax.keypaths import dotted


class UserError(Exception):
    """A mistake the user can fix (a path, a flag, a config value); the message says how."""


class ConfigError(UserError, ValueError):
    """A training config that cannot run on this machine (or cannot run at all)."""


class NotAFolder(UserError, FileNotFoundError):
    """A path that should be a local folder (a checkpoint, a HF model folder) or file does not exist."""


class UsageError(UserError, ValueError):
    """Command-line options that do not go together, or a required one that is missing."""


class BadInput(UserError, ValueError):
    """An input the model cannot take (an image AnyRes cannot tile, a prompt longer than the context);
    the message says which one and why."""


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
STAGES = (1, 2)


def looks_like_hub_id(path: str) -> bool:
    """'llava-hf/llava-1.5-7b-hf': an `org/name` that is not a local path."""
    return bool(HUB_ID.match(str(path))) and not os.path.exists(path)


def missing_folder_message(path: str, what: str, pass_as: str = "DIR") -> str:
    """'no such <what>: PATH', with how to get the folder when PATH looks like a HuggingFace hub id
    (`pass_as`: what of the downloaded folder to pass instead)."""
    message = f"no such {what}: {path}"
    if looks_like_hub_id(path):
        message += (f" (if {path} is a HuggingFace hub id: llava-jax reads local folders only; on a machine "
                    f"with network run `huggingface-cli download {path} --local-dir DIR`, copy DIR here "
                    f"and pass {pass_as})")
    return message


def require_folder(path: str, what: str = "folder") -> str:
    """Raise NotAFolder (with the hub-id hint) unless `path` is an existing local folder."""
    if not path or not os.path.isdir(path):
        raise NotAFolder(missing_folder_message(path, what))
    return path


def require_file(path: str, what: str = "file", pass_as: str = "the file in DIR") -> str:
    """Raise NotAFolder (with the hub-id hint) unless `path` is an existing local file."""
    if path and os.path.isdir(path):
        raise NotAFolder(f"{what} {path} is a folder, not a file")
    if not path or not os.path.isfile(path):
        raise NotAFolder(missing_folder_message(path, what, pass_as))
    return path


# ----- how a suggestion is written for each command ------------------------------------------

class Flags:
    """Spells a config key as the flag that sets it in one command.

    style 'train' (llava-jax train, launch/tpu.py train): --config.KEY=VALUE;
    style 'aot': aot's own options (--global-batch, --microbatch, --max-length, --mesh d,f,t)."""

    AOT = {"global_batch_size": "--global-batch", "microbatch_size": "--microbatch", "max_length": "--max-length"}

    def __init__(self, style: str = "train"):
        if style not in ("train", "aot"):
            raise ValueError(f"unknown flag style {style!r}")
        self.style = style

    def set(self, key: str, value) -> str:
        if self.style == "aot" and key in self.AOT:
            return f"{self.AOT[key]}={value}"
        if isinstance(value, str):
            value = value if value else "''"
        return f"--config.{key}={value}"

    def mesh(self, raw: Sequence[int], new: Sequence[int]) -> str:
        if self.style == "aot":
            return "--mesh=" + ",".join(str(v) for v in new)
        return " ".join(f"--config.mesh.{axis}={v}" for axis, r, v in zip(("data", "fsdp", "tensor"), raw, new)
                        if r != v)


# ----- the mesh --------------------------------------------------------------------------------

def resolve_mesh(raw: Sequence[int], num_devices: int) -> Optional[tuple]:
    """(data, fsdp, tensor) with a -1 filled in, or None when the sizes cannot cover num_devices."""
    sizes = [int(v) for v in raw]
    if sizes.count(-1) > 1 or any(v == 0 or v < -1 for v in sizes):
        return None
    known = math.prod(v for v in sizes if v != -1)
    if -1 in sizes:
        if num_devices % known:
            return None
        sizes[sizes.index(-1)] = num_devices // known
    return tuple(sizes) if math.prod(sizes) == num_devices else None


def param_axes(model_config) -> list:
    """[(name, shape, mesh axes per dim)] of every model parameter (abstract: nothing is allocated)."""
    from flax import nnx

    from llava_jax import sharding
    from llava_jax.models.llava import LlavaModel

    model = nnx.eval_shape(lambda: LlavaModel(model_config, rngs=nnx.Rngs(0)))
    out = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        spec = tuple(sharding.variable_spec(var))
        shape = tuple(var.get_value().shape if hasattr(var, "get_value") else var.value.shape)
        spec = spec + (None,) * (len(shape) - len(spec))
        out.append((dotted(path), shape, spec))
    return out


def _axis_size(entry, sizes: dict) -> int:
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(sizes[n] for n in names)


def param_problem(params: list, mesh: Sequence[int]) -> Optional[str]:
    """The first parameter dimension the mesh does not divide, as text; None when all fit."""
    sizes = dict(zip(("data", "fsdp", "tensor"), mesh))
    for name, shape, spec in params:
        for dim, entry in zip(shape, spec):
            n = _axis_size(entry, sizes)
            if n > 1 and dim % n:
                return f"parameter {name} {shape} has a dimension of {dim} split over {entry} = {n} devices"
    return None


def _batch_ok(batch: int, microbatch: int, dp: int) -> bool:
    if batch % dp:
        return False
    return not (0 < microbatch < batch) or microbatch % dp == 0


def candidate_meshes(num_devices: int, batch: Optional[int], microbatch: int, params: Optional[list]) -> list:
    """Meshes (data, fsdp, tensor) of num_devices that the batch (None: any) and parameters fit, best
    first: the most data parallelism, then the least tensor parallelism, then fsdp before data."""
    divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
    found = []
    for data, fsdp in itertools.product(divisors, repeat=2):
        if num_devices % (data * fsdp):
            continue
        mesh = (data, fsdp, num_devices // (data * fsdp))
        if batch is not None and not _batch_ok(batch, microbatch, data * fsdp):
            continue
        if params is not None and param_problem(params, mesh):
            continue
        found.append(mesh)
    return sorted(found, key=lambda m: (-(m[0] * m[1]), m[2], m[0]))


# ----- the checks --------------------------------------------------------------------------------

def check_train(config, num_devices: Optional[int], num_processes: int = 1, *, style: str = "train",
                check_paths: bool = True, check_params: bool = True) -> None:
    """Raise ConfigError listing every problem of `config` (a TrainConfig, or the ml_collections
    ConfigDict it is made from) on `num_devices` devices in `num_processes` processes; each problem
    says what to set. num_devices None: the checks that do not depend on the machine only."""
    from llava_jax.train.config import train_config

    config = train_config(config)  # a key of the wrong type (or a model that cannot be) fails here, alone
    flags = Flags(style)
    problems = []
    model_config = config.model

    stage = config.stage
    if stage not in STAGES:
        problems.append(f"stage={stage!r} is not a training stage; set {flags.set('stage', 1)} (projector "
                        f"only) or {flags.set('stage', 2)} (projector + LLM)")

    batch, microbatch = config.global_batch_size, config.microbatch_size
    if batch <= 0:
        problems.append(f"global_batch_size={batch} must be positive")
        batch = max(batch, 1)
    if microbatch < 0:
        problems.append(f"microbatch_size={microbatch} must be 0 (no accumulation) or positive")
        microbatch = 0
    if batch % num_processes:
        problems.append(f"global_batch_size={batch} is not divisible by the {num_processes} processes; set "
                        f"{flags.set('global_batch_size', _round_up(batch, num_processes))}")
    if 0 < microbatch < batch and batch % microbatch:
        problems.append(f"global_batch_size={batch} is not a multiple of microbatch_size={microbatch}; set "
                        f"{flags.set('microbatch_size', _divisor_near(batch, microbatch, 1))} or "
                        f"{flags.set('microbatch_size', 0)} (no accumulation)")

    if num_devices is not None:
        params = None
        if check_params:
            try:
                params = param_axes(model_config)
            except Exception:  # noqa: BLE001 - a model that cannot be built fails later with its own error
                params = None
        problems += _mesh_problems(config, num_devices, batch, microbatch, params, flags)

    images = max(1, config.data.max_images_per_row)
    image_tokens = images * max_image_tokens(model_config)
    length = config.max_length
    positions = model_config.text.max_position_embeddings
    if length <= image_tokens:
        want = max(min(_round_up(image_tokens + 64, 64), positions), image_tokens + 1)
        worst = (f" (AnyRes worst case: {images} x {image_tokens // images} tokens, an image that fills the largest "
                 f"grid)" if model_config.anyres else "")
        problems.append(f"max_length={length} leaves no room for text after the {image_tokens} image tokens of a "
                        f"row{worst}; set {flags.set('max_length', want)}")

    if stage == 1 and config.init.stage1:
        problems.append(f"init.stage1={config.init.stage1!r} is for stage 2 (it supplies the trained projector); "
                        f"stage 1 trains the projector from scratch: set {flags.set('init.stage1', '')}")
    if check_paths:
        problems += _path_problems(config, flags)

    template = config.data.template
    from llava_jax.data import conversation as conv

    names = sorted(conv.TEMPLATES) + sorted(conv.ALIASES)
    if template not in names:
        close = difflib.get_close_matches(template, names, n=1)
        fix = flags.set("data.template", close[0] if close else ("plain" if stage == 1 else "vicuna_v1"))
        problems.append(f"data.template={template!r} is not a conversation template (known: {', '.join(names)}); "
                        f"set {fix}")

    if problems:
        raise ConfigError("; ".join(problems))


def _mesh_problems(config, num_devices: int, batch: int, microbatch: int, params: Optional[list],
                   flags: Flags) -> list:
    """The mesh against the device count, the batch against data x fsdp, parameters against their axes."""
    raw = (config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    mesh = resolve_mesh(raw, num_devices)
    candidates = candidate_meshes(num_devices, batch, microbatch, params)
    if candidates:
        hint = f"set {flags.mesh(raw, candidates[0])}"
    else:  # no mesh fits this batch: one that fits the model, with a batch that fits that mesh
        fits_model = sorted(candidate_meshes(num_devices, None, 0, params),
                            key=lambda m: (m[2], -(m[0] * m[1]), m[0]))
        if fits_model:
            m = fits_model[0]
            fixes = [flags.mesh(raw, m), flags.set("global_batch_size", _batch_for(batch, microbatch, m[0] * m[1]))]
            hint = "set " + " ".join(f for f in fixes if f)
        else:
            hint = f"no mesh of {num_devices} devices divides the model's parameters; use another device count"
    if mesh is None:
        return [f"mesh data={raw[0]} fsdp={raw[1]} tensor={raw[2]} does not cover the {num_devices} devices "
                f"(the product must be {num_devices}, one size may be -1); {hint}"]
    problems = []
    dp = mesh[0] * mesh[1]
    if not _batch_ok(batch, microbatch, dp):
        where = f"the {dp} data-parallel devices (mesh data={mesh[0]} x fsdp={mesh[1]})"
        if batch % dp:
            what = f"global_batch_size={batch} is not divisible by {where}"
            fix = flags.set("global_batch_size", _batch_for(batch, microbatch, dp))
        else:
            what = f"microbatch_size={microbatch} is not divisible by {where}"
            fix = flags.set("microbatch_size", _divisor_near(batch, microbatch, dp))
        alt = f", or {flags.mesh(raw, candidates[0])}" if candidates else ""
        problems.append(f"{what}; set {fix}{alt}")
    bad = param_problem(params, mesh) if params is not None else None
    if bad:
        problems.append(f"mesh data={mesh[0]} fsdp={mesh[1]} tensor={mesh[2]}: {bad}; {hint}")
    return problems


def max_image_tokens(model_config) -> int:
    """Placeholders the largest image takes: LLaVA-1.5's fixed count, or for AnyRes the most over the
    grids (an image of a grid's exact shape keeps its whole tile grid: nothing is unpadded)."""
    if not model_config.anyres:
        return int(model_config.num_image_tokens)
    from llava_jax.data import anyres

    v = model_config.vision
    return max(anyres.num_image_tokens(p, model_config.image_grid_pinpoints, v.image_size, v.patch_size)
               for p in model_config.image_grid_pinpoints)


def check_tokenizer(config, tokenizer) -> None:
    """Every id the tokenizer can produce must have a row in the embedding table (the image
    placeholder id excepted: it only marks where image features go), and the template must suit the
    tokenizer (the conversation module's own check: e.g. its answer-closing token is one token)."""
    from llava_jax.data import conversation as conv
    from llava_jax.train.config import train_config

    config = train_config(config)
    vocab = config.model.text.vocab_size
    size = len(tokenizer)
    allowed = vocab + (1 if config.model.image_token_id == vocab else 0)
    if size > allowed:
        raise ConfigError(f"the tokenizer has {size} tokens but the model's embedding table has {vocab} rows "
                          f"(model.text.vocab_size); use the tokenizer the model was trained with "
                          f"(--config.tokenizer=FOLDER) or set --config.model.text.vocab_size={size}")
    template_check = getattr(conv, "check_tokenizer", None)
    if template_check is not None:
        template_check(config.data.template, tokenizer)  # raises TemplateMismatch, a UserError


def _path_problems(config, flags: Flags) -> list:
    problems = []
    for key, what in (("init.base", "model folder"), ("init.stage1", "stage-1 workdir")):
        path = config.init.base if key == "init.base" else config.init.stage1
        if not path or _remote(path):
            continue
        if not os.path.isdir(path):
            problems.append(f"{key}: {missing_folder_message(path, what)}; set {flags.set(key, 'FOLDER')} "
                            f"or {flags.set(key, '')}")
        elif not (os.path.isdir(os.path.join(path, "params")) or os.path.isdir(os.path.join(path, "checkpoints"))):
            problems.append(f"{key}={path!r} holds no parameters (neither params/ nor checkpoints/<step>/); "
                            f"point it at a llava-jax model folder or training workdir")
    if config.tokenizer and not _remote(config.tokenizer) and not os.path.isdir(config.tokenizer):
        problems.append(f"tokenizer: {missing_folder_message(config.tokenizer, 'tokenizer folder')}")
    source = config.data.source
    if source == "json":
        for path in filter(None, (p.strip() for p in config.data.json_path.split(","))):
            if not _remote(path) and not os.path.exists(path):
                problems.append(f"data.json_path: no such file: {path}; set {flags.set('data.json_path', 'FILE')}")
        folder = config.data.image_folder
        if folder and not _remote(folder) and not os.path.isdir(folder):
            problems.append(f"data.image_folder: no such folder: {folder}; set "
                            f"{flags.set('data.image_folder', 'FOLDER')}")
    elif source == "arrayrecord":
        folder = config.data.arrayrecord_dir
        if not folder or (not _remote(folder) and not os.path.isdir(folder)):
            problems.append(f"data.arrayrecord_dir: no such folder: {folder!r}; set "
                            f"{flags.set('data.arrayrecord_dir', 'FOLDER')}")
    elif source != "synthetic":
        problems.append(f"data.source={source!r} is not a data source; set {flags.set('data.source', 'json')}, "
                        f"arrayrecord or synthetic")
    return problems


def _remote(path: str) -> bool:
    return "://" in str(path)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _batch_for(batch: int, microbatch: int, dp: int) -> int:
    """The smallest global batch >= batch that dp divides (and the microbatch, when one is set)."""
    step = dp if not (0 < microbatch < batch) else math.lcm(dp, _round_up(microbatch, dp))
    return _round_up(batch, step)


def _divisor_near(batch: int, microbatch: int, multiple: int) -> int:
    """The divisor of batch that is a multiple of `multiple` closest to microbatch (0 if none)."""
    options = [d for d in range(multiple, batch + 1, multiple) if batch % d == 0]
    return min(options, key=lambda d: (abs(d - microbatch), -d)) if options else 0


def device_count_of(accelerator_type: str) -> tuple:
    """(jax devices, hosts) of a Cloud TPU accelerator type: v4-32 -> (16, 4), v5litepod-16 -> (16, 4).
    v2/v3 count TensorCores (one jax device each); v4/v5p count TensorCores, two per jax device."""
    m = re.fullmatch(r"(v\d+[a-z]*?)(?:litepod|lite|e|p)?-(\d+)", accelerator_type.strip().lower())
    if not m:
        raise UserError(f"accelerator type {accelerator_type!r} is not like v4-32, v5litepod-16, v5p-64 or v6e-8")
    count = int(m.group(2))
    kind = accelerator_type.lower()
    if kind.startswith(("v4", "v5p")):
        devices = max(1, count // 2)
        return devices, max(1, devices // 4)
    if kind.startswith(("v2", "v3")):
        return count, max(1, count // 8)
    return count, (1 if count <= 8 else count // 4)  # v5e / v6e: one host up to 8 chips, then 4 per host
