#!/usr/bin/env python3
"""TPU VM / pod-slice helper: create, install, train, logs, delete. Every subcommand takes --dry-run
(print the gcloud commands instead of running them).

  python launch/tpu.py create  --name N --zone Z [--project P] --accelerator-type v4-32 [--version V] [--spot]
  python launch/tpu.py install --name N --zone Z [--project P] [--repo URL|--source DIR]
  python launch/tpu.py train   --name N --zone Z [--project P] --config configs/X.py:ARG --workdir gs://B/RUN
                               [--accelerator-type v4-32] [-- --config.k=v ...]
  python launch/tpu.py logs    --name N --zone Z [--project P] [--worker 0] [--follow]
  python launch/tpu.py delete  --name N --zone Z [--project P]

`train` starts `python3 -m llava_jax.cli train --distributed` (= llava-jax train) on all workers at once (jax.distributed finds the
pod's other hosts itself), in the background with its output in ~/train.log on every worker; the
workdir should be a gs:// path all hosts share. Re-running `train` resumes from the latest checkpoint.
Before starting, `train` checks the config here with llava_jax.validate (with --accelerator-type also
the mesh and batch against that slice's chips) and stops with one line saying what to set.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

DEFAULT_VERSION = "tpu-ubuntu2204-base"
DEFAULT_REPO = "https://github.com/llava-jax/llava-jax.git"
REMOTE_DIR = "~/llava-jax"
LOG_FILE = "~/train.log"


def _base(args) -> list:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm"]
    return cmd


def _where(args) -> list:
    out = [f"--zone={args.zone}"]
    if args.project:
        out.append(f"--project={args.project}")
    return out


def ssh(args, remote: str, worker: str = "all") -> list:
    return _base(args) + ["ssh", args.name, *_where(args), f"--worker={worker}", f"--command={remote}"]


def create_commands(args) -> list:
    cmd = _base(args) + ["create", args.name, *_where(args), f"--accelerator-type={args.accelerator_type}",
                         f"--version={args.version}"]
    if args.spot:
        cmd.append("--spot")
    return [cmd]


def install_commands(args) -> list:
    cmds = []
    if args.source:
        cmds.append(_base(args) + ["scp", "--recurse", args.source, f"{args.name}:{REMOTE_DIR}", *_where(args),
                                   "--worker=all"])
        fetch = "true"
    else:
        fetch = f"(test -d {REMOTE_DIR} || git clone {shlex.quote(args.repo)} {REMOTE_DIR})"
    remote = (f"{fetch} && cd {REMOTE_DIR} && python3 -m pip install --upgrade pip && "
              f"python3 -m pip install -e '.[tpu]'")
    cmds.append(ssh(args, remote))
    return cmds


def train_commands(args) -> list:
    flags = ["--config", args.config, "--workdir", args.workdir, "--distributed", "--noprogress", *args.extra]
    run = " ".join(shlex.quote(x) for x in flags)
    remote = (f"cd {REMOTE_DIR} && nohup python3 -m llava_jax.cli train {run} > {LOG_FILE} 2>&1 &")
    return [ssh(args, remote)]


def logs_commands(args) -> list:
    remote = f"tail {'-f ' if args.follow else ''}-n {args.lines} {LOG_FILE}"
    return [ssh(args, remote, worker=str(args.worker))]


def delete_commands(args) -> list:
    return [_base(args) + ["delete", args.name, *_where(args), "--quiet"]]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="launch/tpu.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, help_text):
        s = sub.add_parser(name, help=help_text)
        s.add_argument("--name", required=True, help="TPU VM / pod slice name")
        s.add_argument("--zone", required=True)
        s.add_argument("--project", default="")
        s.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
        return s

    s = add("create", "create a TPU VM or pod slice")
    s.add_argument("--accelerator-type", required=True, help="e.g. v5litepod-8, v4-32, v5p-64")
    s.add_argument("--version", default=DEFAULT_VERSION, help="TPU VM software version")
    s.add_argument("--spot", action="store_true")
    s = add("install", "install llava-jax[tpu] on all workers")
    s.add_argument("--repo", default=DEFAULT_REPO, help="git URL to clone on each worker")
    s.add_argument("--source", default="", help="local checkout to copy instead of cloning")
    s = add("train", "start `llava-jax train` on all workers")
    s.add_argument("--config", required=True)
    s.add_argument("--workdir", required=True, help="a gs:// folder shared by all hosts")
    s.add_argument("--accelerator-type", default="", help="e.g. v4-32: check the mesh and batch against its "
                   "chips before starting (the config is always checked)")
    s = add("logs", "show a worker's train.log")
    s.add_argument("--worker", default="0")
    s.add_argument("--lines", type=int, default=100)
    s.add_argument("--follow", action="store_true")
    add("delete", "delete the TPU VM / pod slice")

    argv = list(argv)
    extra = []
    if "--" in argv:  # everything after -- goes to `llava-jax train` (e.g. --config.key=value)
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = p.parse_args(argv)
    args.extra = extra
    return args


BUILDERS = {"create": create_commands, "install": install_commands, "train": train_commands,
            "logs": logs_commands, "delete": delete_commands}


def check_train_config(args) -> None:
    """Load the config with the overrides after `--` and run llava_jax.validate on it here, so a
    config that cannot run fails in seconds instead of on every worker after the install. Paths are
    not checked (they live on the workers); the mesh and batch only with --accelerator-type."""
    # Needed: the launching machine may hold only this checkout (the package is installed on the
    # workers), and `python launch/tpu.py` puts launch/, not the checkout, on sys.path.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if repo not in sys.path:
        sys.path.insert(0, repo)
    try:
        from llava_jax.cli import choose_platform

        choose_platform()  # no TPU probing (and its noise) on the machine that launches
        from llava_jax import validate
        from llava_jax.train.loop import parse_flags
    except ImportError as e:
        print(f"note: the config is not checked here (llava_jax is not importable: {e})", file=sys.stderr)
        return
    fv = parse_flags(["--config", args.config, "--workdir", args.workdir, *args.extra])
    devices, hosts = validate.device_count_of(args.accelerator_type) if args.accelerator_type else (None, 1)
    validate.check_train(fv.config, devices, hosts, check_paths=False)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "train":
        try:
            check_train_config(args)
        except Exception as e:  # noqa: BLE001 - only llava_jax's UserError is an answer
            if not any(c.__name__ == "UserError" for c in type(e).__mro__):  # llava_jax may be absent
                raise
            print(f"launch/tpu.py train: error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
    for cmd in BUILDERS[args.command](args):
        print(" ".join(shlex.quote(c) for c in cmd), flush=True)
        if not args.dry_run:
            rc = subprocess.call(cmd)
            if rc:
                return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
