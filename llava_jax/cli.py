"""`llava-jax <command>`: dispatch to the command's own module (each parses its own arguments).

Manners shared by every command:
- A mistake the user can fix (a missing checkpoint, an unknown config file or key, a config that
  cannot run on this machine) is raised as llava_jax.validate.UserError and printed as one line,
  `llava-jax <command>: error: <what to fix>`, with exit status 2. `--debug` (anywhere on the
  command line) or LLAVA_JAX_DEBUG=1 shows the traceback instead. Any other exception is a bug and
  keeps its traceback.
- On a machine without a TPU, JAX_PLATFORMS is set to `cpu` (unless it is set already, or a GPU is
  present) before JAX is imported, so an installed libtpu (the test extra) does not probe for TPU
  workers and print errors. `tpu_present()` says how a TPU is recognised.
"""
from __future__ import annotations

import glob
import importlib
import os
import sys

# name -> (module with main(argv), one-line help)
COMMANDS = {
    "quickstart": ("llava_jax.quickstart", "the whole recipe on a synthetic world, on a CPU"),
    "train": ("llava_jax.train.loop", "train a stage from a config (--config configs/X.py:ARG --workdir DIR)"),
    "info": ("llava_jax.info", "parameter counts of a config, per component"),
    "aot": ("llava_jax.aot", "compile the train step for a TPU topology and report memory"),
    "plan": ("llava_jax.plan", "time and chip-hours of a training stage on a TPU slice"),
    "chat": ("llava_jax.infer.chat", "chat with a checkpoint in the terminal"),
    "serve": ("llava_jax.infer.server", "OpenAI-compatible HTTP server with a chat page"),
    "eval": ("llava_jax.eval.cli", "scienceqa | llava-bench | vqa evaluations"),
    "datagen": ("llava_jax.datagen.cli", "instruction-data generation and the CC3M filter"),
    "data": ("llava_jax.data.cli", "data preparation (LLaVA JSON -> ArrayRecord shards)"),
    "merge": ("llava_jax.peft_io", "merge a LoRA adapter into its base: a plain model folder"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: llava-jax <command> [args] [--debug]", "", "commands:"]
    lines += [f"  {name:<{width}}  {doc}" for name, (_, doc) in COMMANDS.items()]
    lines += ["", "--debug (or LLAVA_JAX_DEBUG=1): show the traceback of a user error instead of one line"]
    return "\n".join(lines)


TPU_ENV_VARS = ("TPU_NAME", "TPU_WORKER_ID", "TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "CLOUD_TPU_TASK_ID")


def tpu_present() -> bool:
    """Whether this machine may have TPU chips: JAX's own test (a Google PCI device with a TPU
    device id) or, should that private helper move, /dev/accel* (v2-v5e) or a numbered /dev/vfio
    group (v5p, v6e); a TPU environment variable counts as well. Generous on purpose: a wrong yes
    only leaves the choice to JAX, as without this."""
    if any(os.environ.get(v) for v in TPU_ENV_VARS):
        return True
    if glob.glob("/dev/accel*") or [p for p in glob.glob("/dev/vfio/*") if os.path.basename(p).isdigit()]:
        return True
    try:
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # noqa: BLE001 - private API; the checks above stand alone
        return False


def gpu_present() -> bool:
    if glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/kfd"):
        return True
    return os.path.exists("/dev/dxg")  # WSL2


def choose_platform(environ=os.environ) -> bool:
    """JAX_PLATFORMS=cpu where neither a TPU nor a GPU is present and the user has not chosen one.
    The package's import already imported jax (not its backends), so jax's config is set as well;
    the variable is for child processes. -> whether it was set."""
    if "JAX_PLATFORMS" in environ or tpu_present() or gpu_present():
        return False
    jax = sys.modules.get("jax")
    if jax is not None:
        from jax._src import xla_bridge

        if jax.config.jax_platforms or getattr(xla_bridge, "_backends", None):
            return False  # chosen in code, or backends already running: too late to change
        jax.config.update("jax_platforms", "cpu")
    environ["JAX_PLATFORMS"] = "cpu"
    return True


def debug_enabled(environ=os.environ) -> bool:
    return environ.get("LLAVA_JAX_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def one_line(error: BaseException) -> str:
    """An exception's message with its white space (newlines too) folded into single spaces."""
    return " ".join(str(error).split()) or type(error).__name__


def run_script(prog: str, work, debug: bool = False,
               failures: tuple = (ValueError, FileNotFoundError, ImportError)) -> int:
    """The manners of `llava-jax` for a script of convert/: -> work()'s exit status, where a UserError
    prints `PROG: error: MESSAGE` on one line and gives 2 (debug or LLAVA_JAX_DEBUG=1: its traceback),
    and a conversion that fails on its input (`failures`) prints `PROG: MESSAGE` and gives 1."""
    from llava_jax.validate import UserError

    try:
        return int(work() or 0)
    except UserError as e:
        if debug or debug_enabled():
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr, flush=True)
        return 2
    except failures as e:
        print(f"{prog}: {e}", file=sys.stderr, flush=True)
        return 1


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or debug_enabled()
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"llava-jax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    choose_platform()
    from llava_jax.validate import UserError

    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.main(rest) or 0)
    except UserError as e:
        if debug:
            raise
        print(f"llava-jax {name}: error: {one_line(e)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"llava-jax {name}: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
