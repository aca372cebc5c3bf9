"""`llava-jax train --config configs/X.py:ARG --workdir DIR [--config.key=value ...]`

Creates (or resumes) the sharded train state, streams this host's shard of the data, runs the
jitted step, logs metrics, and checkpoints asynchronously. Re-running the same command resumes from
the latest checkpoint (a finished run says it is already done); SIGTERM saves a checkpoint and exits
cleanly; the last line says where the model is.

Before anything is built, llava_jax.validate checks the config against the devices and refuses what
cannot run, in one line with a setting that works (a global batch smaller than data x fsdp is refused:
the suggestion moves devices to the tensor axis or enlarges the batch). Mistakes in flags and config
files are UserErrors: `llava-jax` prints them as one line and exits with status 2.
"""
from __future__ import annotations

import ast
import json
import logging
import os
import re
import signal
import sys
import time
from typing import Callable, Optional

import jax
import numpy as np

from llava_jax import checkpoint, peft_io, sharding, validate
from llava_jax.models import lora as lora_lib
from llava_jax.train import flops as flops_lib
from llava_jax.train import optim
from llava_jax.train import step as step_lib
from llava_jax.train.checkpointer import TrainCheckpointer
from llava_jax.train.config import SCHEMA_FILE, TrainConfig, train_config
from llava_jax.train.metrics import MetricsWriter
from llava_jax.train.profile import StepProfiler, parse_profile_steps
from llava_jax.train.setup import train_setup
from llava_jax.validate import UserError

log = logging.getLogger("llava_jax.train")


# ----- command line ---------------------------------------------------------------------------

def parse_flags(argv):
    """absl flags on a private FlagValues, so main(argv) can run more than once per process."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["llava-jax train"] + list(argv)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "training config: configs/X.py[:ARG]", flag_values=fv,
                                    lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics, config.json, tokenizer",
                        flag_values=fv)
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (TPU pods detect the "
                      "cluster themselves; elsewhere give the three flags below)", flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "multi-process: host:port of process 0", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "multi-process: number of processes", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "multi-process: this process's index", flag_values=fv)
    flags.DEFINE_bool("progress", True, "show a tqdm progress bar", flag_values=fv)
    _check_config_file(argv)
    try:
        fv(argv)
    except flags.Error as e:
        raise UserError(_flag_error_text(str(e))) from e
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a key the config lacks
        text = _flag_error_text(str(e))
        key = re.match(r"'([^']+)'", text)
        flag = next((a.split("=", 1)[0] for a in argv[1:] if key and a.startswith("--config.")
                     and a.split("=", 1)[0].split(".")[-1] == key.group(1)), None)
        hint = text[key.end():].strip(" ;") if key else text
        hint = hint[:1].lower() + hint[1:]
        raise UserError(f"{flag or 'a --config. override'}: no such config key" + (f"; {hint}" if hint else "")
                        + f" (every key and its default: {SCHEMA_FILE})") from e
    if fv.config is None:
        raise UserError("--config configs/X.py[:ARG] is required")
    if not fv.workdir:
        raise UserError("--workdir DIR is required")
    return fv


def _check_config_file(argv) -> None:
    """config_flags defers a missing file's error to the first use of the config: say it now."""
    from llava_jax.config_files import split_spec

    for i, arg in enumerate(argv):
        spec = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else (
            arg.split("=", 1)[1] if arg.startswith("--config=") else None)
        if spec is not None:
            path, _ = split_spec(spec)
            if not os.path.isfile(path):
                raise UserError(f"config file {path!r} not found (from --config {spec!r}); the configs are in "
                                "the repository's configs/ folder, e.g. configs/tiny.py:stage2")


def _flag_error_text(text: str) -> str:
    """One line from absl / ml_collections' flag errors: the config file's own exception (they embed
    its traceback), and KeyError reprs unquoted ('\\'lrr\\'\\nDid you mean ...' -> 'lrr': did you mean ...)."""
    if "Traceback (most recent call last)" in text:
        head = re.match(r"flag (--config=\S+?): Error whilst", text)
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        last = re.sub(r"^\w+(?:\.\w+)*(?:Error|Exception): ", "", last.strip())
        return f"{head.group(1) if head else 'config file'}: {last}"
    for _ in range(3):  # KeyError(str) inside AttributeError(repr) nests quotes and escapes
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            try:
                text = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                break
    parts = [p.strip() for p in text.splitlines() if p.strip()]
    return "; ".join(parts)


def init_distributed(enabled: bool = False, coordinator_address: Optional[str] = None,
                     num_processes: Optional[int] = None, process_id: Optional[int] = None) -> None:
    """Join a multi-process job. On TPU pods jax finds the cluster itself (enabled=True)."""
    if coordinator_address:
        if jax.config.jax_platforms == "cpu" or os.environ.get("JAX_PLATFORMS") == "cpu":
            # CPU processes need a collectives backend to talk to each other.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
    elif enabled:
        jax.distributed.initialize()


def main(argv) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    fv = parse_flags(argv)
    init_distributed(fv.distributed, fv.coordinator_address, fv.num_processes, fv.process_id)
    result = train(fv.config, fv.workdir, progress=fv.progress)
    return 0 if result["status"] in ("finished", "preempted") else 1


# ----- pieces ---------------------------------------------------------------------------------

def resolve_tokenizer(config: TrainConfig, workdir: Optional[str] = None):
    """config.tokenizer (a folder), else init.base's checkpoint folder, else the one a previous run
    saved in the workdir; for the synthetic source without any, a small tokenizer is built."""
    from transformers import AutoTokenizer

    config = train_config(config)

    if config.tokenizer:
        return AutoTokenizer.from_pretrained(config.tokenizer)
    if config.init.base:
        return checkpoint.load_tokenizer(config.init.base)
    if workdir and checkpoint.tokenizer_files(workdir):
        return AutoTokenizer.from_pretrained(workdir)
    if config.data.source == "synthetic":
        return synthetic_tokenizer(config)
    raise validate.ConfigError("no tokenizer: set --config.tokenizer=FOLDER or --config.init.base=MODEL_FOLDER "
                               f"(data.source={config.data.source!r} needs one)")


def synthetic_tokenizer(config, max_records: int = 1024):
    """A word-level tokenizer over the synthetic source's rendered text, sized to the model: the most
    frequent words fill the ids below image_token_id (rarer ones become <unk>) and `<image>` takes
    image_token_id (llava-hf convention). Word-level keeps the tiny models' rows short.
    For the templates that close answers with a special token (chatml, chatml_direct) `<|im_start|>`
    and `<|im_end|>` are special tokens too, and a newline is a word of its own.
    Deterministic; it is also saved in the workdir, where a resumed run finds it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from llava_jax.data import conversation as conv
    from llava_jax.data.pipeline import make_source

    config = train_config(config)

    template = conv.get_template(config.data.template)
    if template.style == "hf":
        raise validate.ConfigError(f"data.template={config.data.template!r} renders with a tokenizer's own "
                                   f"chat_template, and the synthetic source's built-in tokenizer has none; "
                                   f"set --config.data.template=chatml (or vicuna_v1), or "
                                   f"--config.tokenizer=FOLDER with a chat_template")
    mc = config.model
    base_size = mc.image_token_id
    markers = [conv.IM_START, template.end] if template.end else []  # ChatML's turn markers
    specials = ["<unk>", "<s>", "</s>"] + markers
    splits = [pre_tokenizers.Split("\n", behavior="isolated")] if markers else []
    source = make_source(config, mc, "train")
    texts = []
    for i in range(min(len(source), max_records)):
        text = conv.render(source[i]["conversations"], template)
        for token in specials + [conv.IMAGE_PLACEHOLDER]:
            text = text.replace(token, " ")
        texts.append(text)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits + [pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=base_size, special_tokens=specials,
                                                             show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>", padding_side="right",
                                   **({"additional_special_tokens": markers} if markers else {}))
    filler = base_size - len(fast)
    if filler > 0:  # unused ids so that <image> lands on image_token_id
        fast.add_tokens([f"<unused_{i}>" for i in range(filler)], special_tokens=True)
    fast.add_tokens(["<image>"], special_tokens=True)
    if fast.convert_tokens_to_ids("<image>") != mc.image_token_id or len(fast) > mc.text.vocab_size:
        raise ValueError(f"synthetic tokenizer: <image> got id {fast.convert_tokens_to_ids('<image>')}, "
                         f"expected {mc.image_token_id}; {len(fast)} tokens for vocab_size {mc.text.vocab_size}")
    return fast


def default_data_factory(config, tokenizer, model_config, *, process_index, process_count, split="train"):
    from llava_jax.data.pipeline import make_train_iterator

    return make_train_iterator(config, tokenizer, model_config, process_index=process_index,
                               process_count=process_count, split=split)


def resolve_total_steps(config: TrainConfig, data_iter) -> int:
    if config.total_steps > 0:
        return config.total_steps
    size = getattr(data_iter, "num_records", None)
    if not size:
        raise ValueError("config.total_steps is 0 but the data iterator does not report its size "
                         "(num_records); set --config.total_steps=N")
    return max(1, int(config.num_epochs * size) // config.global_batch_size)


def to_global_batch(local: dict, mesh) -> dict:
    """This host's rows -> global jax arrays split over ("data", "fsdp")."""
    missing = [k for k in step_lib.BATCH_KEYS if k not in local]
    if missing:
        raise KeyError(f"training batch lacks {missing}; it has {sorted(local)}")
    out = {}
    for key in step_lib.BATCH_KEYS + (("image_sizes",) if "image_sizes" in local else ()):  # AnyRes layouts
        value = np.asarray(local[key])
        out[key] = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, value.ndim), value)
    return out


def load_initial_weights(config: TrainConfig, state: dict, layout, lora=None) -> dict:
    """Overwrite the random init with init.base (any parameters it holds) and init.stage1's projector.

    With LoRA the base's float32 projection kernels are cast or quantized to lora.base_dtype."""
    full_target = step_lib.merged_params(layout.abstract)
    loaded = {}
    if config.init.base:
        target = full_target if lora is None else lora_lib.float32_base_target(full_target)
        loaded = checkpoint.restore_params_subset(config.init.base, target)
        if lora is not None:
            loaded = lora_lib.to_base_dtype(loaded, lora)
        _say(f"loaded {len(jax.tree.leaves(loaded))} parameter arrays from init.base={config.init.base}")
    if config.init.stage1:
        projector = checkpoint.restore_params_subset(config.init.stage1, full_target, only=("projector",))
        loaded = step_lib._deep_merge(loaded, projector)
        _say(f"loaded the projector from init.stage1={config.init.stage1}")
    if not loaded:
        return state
    params, frozen = step_lib.split_params(step_lib._deep_merge(step_lib.merged_params(state), loaded), layout)
    # Loaded (and quantized) arrays may lie in other shardings than the state's.
    return jax.device_put(dict(state, params=params, frozen=frozen), layout.shardings)


class _StopSignal:
    """SIGTERM -> finish the current step, save, exit. All processes agree before stopping."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)

    def should_stop(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))


# ----- the loop -------------------------------------------------------------------------------

def train(config, workdir: str, *, data_factory: Optional[Callable] = None, progress: bool = True) -> dict:
    """Run (or resume) training of `config` (a TrainConfig, or the ConfigDict it is made from).
    -> {'status', 'step', 'masked_batches', 'last_metrics'}; a run whose workdir already holds step
    total_steps trains nothing and adds already_done=True (masked_batches None).
    data_factory(config, tokenizer, model_config, *, process_index, process_count, split="train") is
    given the TrainConfig."""
    config = train_config(config)
    data_factory = data_factory or default_data_factory
    # Everything that would otherwise fail inside JAX / Grain / Orbax, said with its fix, before any work.
    validate.check_train(config, jax.device_count(), jax.process_count())
    parse_profile_steps(config.profile_steps)  # a bad value fails before anything compiles
    model_config = config.model
    stage = config.stage
    optim.trainable_roots(stage)  # validates the stage early
    lora = lora_config(config, model_config, stage)
    workdir = os.path.abspath(workdir)
    is_main = jax.process_index() == 0
    mesh = sharding.mesh_from_config(config.mesh)
    _say(f"mesh {dict(mesh.shape)} over {mesh.size} devices ({jax.process_count()} processes)")

    tokenizer = resolve_tokenizer(config, workdir)
    validate.check_tokenizer(config, tokenizer)
    data_iter = data_factory(config, tokenizer, model_config, process_index=jax.process_index(),
                             process_count=jax.process_count())
    total_steps = resolve_total_steps(config, data_iter)
    setup = train_setup(config, model_config, mesh, total_steps, lora=lora)
    layout = setup.layout

    if is_main:
        checkpoint.write_model_files(workdir, model_config, tokenizer=tokenizer)
        if lora is not None:  # the checkpoints hold adapters + projector; this names their base
            peft_io.write_run_file(workdir, lora, config.init.base)
        # What chat / serve / eval need to prompt this checkpoint the way it was trained.
        with open(os.path.join(workdir, "inference.json"), "w") as f:
            json.dump({"template": config.data.template, "image_aspect": config.data.image_aspect}, f)
    ckpt = TrainCheckpointer(workdir, keep=config.keep_checkpoints)

    start = ckpt.latest_step()
    if start is not None and start >= total_steps:
        ckpt.close()
        _say(f"already done: {workdir} holds step {start} of {total_steps}; nothing to train (raise "
             f"--config.total_steps to continue, or use a new --workdir to start over)")
        _say(f"the model is {workdir} (llava-jax chat --ckpt {workdir})")
        return dict(status="finished", step=start, masked_batches=None, last_metrics={}, already_done=True)
    if start is not None:
        if lora is None:
            params, opt_state, data_state, meta = ckpt.restore(
                start, step_lib.merged_params(layout.abstract), layout.abstract["opt_state"])
            trainable, frozen = step_lib.split_params(params, layout)
        else:  # adapters + projector from the checkpoint, the frozen base from init.base again
            trainable, opt_state, data_state, meta = ckpt.restore(
                start, layout.abstract["params"], layout.abstract["opt_state"])
            frozen = load_initial_weights(config, setup.init_state(), layout, lora)["frozen"]
        step_arr = jax.device_put(np.int32(start), layout.shardings["step"])
        state = dict(step=step_arr, params=trainable, frozen=frozen, opt_state=opt_state)
        if data_state is None:
            _say(f"checkpoint {start} has no data-iterator state for {jax.process_count()} processes; "
                 "the data stream restarts from its beginning")
        else:
            data_iter.set_state(data_state)
        masked_batches = int(meta.get("masked_batches", 0))
        _say(f"resumed from {ckpt.directory} at step {start}")
    else:
        start = 0
        state = load_initial_weights(config, setup.init_state(), layout, lora)
        masked_batches = 0

    eval_iter_factory = _eval_factory(config, tokenizer, model_config, data_factory)
    writer = MetricsWriter(workdir, total_steps, initial_step=start, enabled=is_main, progress=progress)
    peak = config.peak_flops_per_device or flops_lib.peak_flops(jax.devices()[0])

    status, step, last = "finished", start, {}
    profiler = StepProfiler(config.profile_steps, workdir)
    pending, timer, timed_steps, step_flops = [], None, 0, None
    with jax.set_mesh(mesh), _StopSignal() as stop:
        train_step = eval_step = None
        try:
            while step < total_steps:
                local = next(data_iter)
                batch = to_global_batch(local, mesh)
                if train_step is None:
                    batch_sh = jax.tree.map(lambda x: x.sharding, batch)
                    train_step = setup.jit_train_step(batch_sh)
                    b, s = batch["input_ids"].shape
                    # A LoRA step computes the frozen LLM's input gradients but not its weight gradients:
                    # stage 1's accounting (the adapters' own FLOPs are a rounding error at r << width).
                    step_flops = flops_lib.step_flops(model_config, 1 if lora is not None else stage, b, s,
                                                      int(np.prod(batch["pixel_values"].shape[1:-3])))  # x AnyRes tiles
                profiler.before(step + 1)
                state, metrics = train_step(state, batch)
                step += 1
                profiler.after(step, metrics)
                pending.append(metrics)
                if timer is None:  # the first step carries the compilation: time from its end
                    jax.block_until_ready(metrics)
                    timer, timed_steps = time.perf_counter(), 0
                else:
                    timed_steps += 1

                if step % config.log_every == 0 or step == total_steps:
                    last, masked_batches = _log(writer, step, pending, timer, timed_steps, step_flops,
                                                mesh.size, peak, masked_batches)
                    pending, timer, timed_steps = [], time.perf_counter(), 0
                if eval_iter_factory and config.eval_every and step % config.eval_every == 0:
                    if eval_step is None:
                        eval_step = setup.jit_eval_step(batch_sh)
                    eval_loss = _evaluate(eval_step, state, eval_iter_factory(), config.eval_batches, mesh)
                    writer.write(step, {"loss": eval_loss}, prefix="eval_")
                    timer = time.perf_counter()
                writer.advance(step)

                stopping = stop.should_stop()
                if step % config.checkpoint_every == 0 or step == total_steps or stopping:
                    if pending:  # the masked-batch counter in the checkpoint must include every step
                        last, masked_batches = _log(writer, step, pending, timer, timed_steps, step_flops,
                                                    mesh.size, peak, masked_batches)
                        pending, timer, timed_steps = [], time.perf_counter(), 0
                    _save(ckpt, step, state, data_iter, config, masked_batches, lora)
                if stopping:
                    status = "preempted"
                    _say(f"SIGTERM: saved step {step}; run the same command again to resume")
                    break
        finally:
            profiler.close()
            ckpt.close()
            writer.close()
    if status == "finished":
        _say(f"finished step {step} of {total_steps}: the model is {workdir} (llava-jax chat --ckpt {workdir})")
    return dict(status=status, step=step, masked_batches=masked_batches, last_metrics=last)


def _say(message: str) -> None:
    """Run-level events go to stderr on process 0 whatever the logging setup (absl owns logging)."""
    if jax.process_index() == 0:
        print(f"llava-jax train: {message}", file=sys.stderr, flush=True)


def _save(ckpt, step, state, data_iter, config: TrainConfig, masked_batches, lora=None):
    meta = dict(stage=config.stage, masked_batches=int(masked_batches), config=config.to_json())
    # A LoRA run saves only what trains (adapters + projector); its base is init.base (lora.json).
    params = step_lib.merged_params(state) if lora is None else state["params"]
    ckpt.save(step, params, state["opt_state"], data_iter.get_state(), meta)


def lora_config(config: TrainConfig, model_config, stage: int):
    """config.adapters (the LoraConfig of config.lora; None when rank is 0), refused before anything is
    built when it cannot train: a stage other than 2, no base to adapt, a target or rank that does not fit."""
    lora = train_config(config).adapters
    if lora is None:
        return None
    if stage != 2:
        raise validate.ConfigError(f"config.lora.rank={lora.rank} trains adapters on the language model, which "
                                   f"is stage 2; got config.stage={stage} (set --config.lora.rank=0 for stage 1)")
    if not config.init.base:
        raise validate.ConfigError("config.lora needs config.init.base: the pretrained model folder the adapters "
                                   "train on (its checkpoints hold only adapters and the projector)")
    lora.check_shapes(model_config.text)
    return lora


def _log(writer, step, pending, timer, timed_steps, step_flops, num_devices, peak, masked_batches):
    fetched = jax.device_get(pending)
    now = time.perf_counter()
    masked_now = int(sum(int(m["all_masked"]) for m in fetched))
    if masked_now:
        log.warning("%d batch(es) up to step %d had no target tokens (all labels masked): loss 0, no gradient",
                    masked_now, step)
    masked_batches += masked_now
    last = fetched[-1]
    record = dict(
        loss=float(np.mean([m["loss"] for m in fetched])),
        lr=float(last["lr"]),
        grad_norm=float(np.mean([m["grad_norm"] for m in fetched])),
        num_targets=int(sum(int(m["num_targets"]) for m in fetched)),
        masked_batches=masked_batches,
        tokens_per_s=None, mfu=None, step_time_s=None,
    )
    # Steps timed since the timer started (the compile step is never inside a timed window).
    elapsed = now - timer if timer is not None else 0.0
    if timed_steps > 0 and elapsed > 0:
        timed = fetched[-timed_steps:]
        seconds = elapsed / timed_steps
        record["step_time_s"] = seconds
        record["tokens_per_s"] = float(sum(int(m["num_tokens"]) for m in timed)) / elapsed
        record["mfu"] = flops_lib.mfu(step_flops.total, seconds, num_devices, peak)
    writer.write(step, record)
    return record, masked_batches


def _eval_factory(config: TrainConfig, tokenizer, model_config, data_factory):
    has_eval = bool(config.data.eval_json_path or config.data.eval_arrayrecord_dir
                    or config.data.source == "synthetic")
    if not (config.eval_every and has_eval):
        return None
    return lambda: data_factory(config, tokenizer, model_config, process_index=jax.process_index(),
                                process_count=jax.process_count(), split="eval")


def _evaluate(eval_step, state, batches, max_batches: int, mesh) -> float:
    total, count = 0.0, 0
    for i, local in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        nll, n = jax.device_get(eval_step(state, to_global_batch(local, mesh)))
        total, count = total + float(nll), count + int(n)
    return total / max(count, 1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
