"""User errors end in one line, `llava-jax <command>: error: ...`, and exit status 2; --debug (or
LLAVA_JAX_DEBUG=1) shows the traceback; bugs keep theirs. Plus the commands' manners: the closing
line of `train`, a finished run's rerun, a quiet model load, SIGTERM on `serve`, quiet CPU-only runs.
Most cases run in-process through llava_jax.cli.main; three need a fresh interpreter."""
import base64
import contextlib
import importlib.util
import io
import logging
import signal
import subprocess
import sys
import time

import pytest

from llava_jax import cli, validate
from llava_jax.testing.processes import REPO, free_port, subprocess_env

TINY = str(REPO / "configs" / "tiny.py")
HUB_ID = "llava-hf/llava-1.5-7b-hf"


def _fails(capsys, argv, command) -> str:
    """Run the CLI in-process; it must exit 2 with exactly one line on stderr -> that line."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"llava-jax {command}: error: "), err
    return lines[0]


def test_no_such_checkpoint(capsys, tmp_path):
    line = _fails(capsys, ["chat", "--ckpt", str(tmp_path / "nope"), "--prompt", "hi"], "chat")
    assert line == (f"llava-jax chat: error: no such checkpoint (a llava-jax model folder or training workdir): "
                    f"{tmp_path / 'nope'}")


def test_hub_id_where_a_folder_is_expected(capsys):
    line = _fails(capsys, ["chat", "--ckpt", HUB_ID, "--prompt", "hi"], "chat")
    assert f"no such checkpoint (a llava-jax model folder or training workdir): {HUB_ID}" in line
    assert f"huggingface-cli download {HUB_ID} --local-dir DIR" in line and "pass DIR" in line


@pytest.mark.parametrize("command, mesh", [("aot", "2,4"), ("plan", "2,x,1"), ("chat", "1,0,1"), ("serve", "-1,-1,1")])
def test_a_bad_mesh_is_one_line_from_the_one_parser(capsys, tmp_path, command, mesh):
    """aot, plan, chat and serve read --mesh through sharding.parse_mesh: the same line for each."""
    args = {"aot": ["--config", TINY, "--topology", "v5e:2x4"],
            "plan": ["--config", TINY, "--topology", "v5e:2x4", "--samples", "100", "--avg-tokens", "50",
                     "--no-compile"],
            "chat": ["--ckpt", str(tmp_path), "--prompt", "hi"], "serve": ["--ckpt", str(tmp_path)]}[command]
    line = _fails(capsys, [command, *args, f"--mesh={mesh}"], command)
    assert line == (f"llava-jax {command}: error: --mesh takes three sizes data,fsdp,tensor, each a positive "
                    f"integer or -1 (at most one, for the devices left), e.g. --mesh 1,-1,1 (all fsdp) or 1,1,-1 "
                    f"(all tensor); got {mesh!r}")


def _convert_main(script: str):
    """The main() of a convert/ script, loaded in this process."""
    spec = importlib.util.spec_from_file_location(f"convert_{script[:-3]}", REPO / "convert" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _convert_fails(capsys, script, *args) -> str:
    """A convert/ script's user error: exit 2 and exactly one line, `<script>: error: ...` -> that line."""
    assert _convert_main(script)([str(a) for a in args]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{script[:-3]}: error: "), lines
    return lines[0]


def test_convert_scripts_refuse_hub_ids_and_missing_inputs_in_one_line(capsys, tmp_path, monkeypatch):
    platform_chosen = []
    monkeypatch.setattr(cli, "choose_platform", lambda: platform_chosen.append(True))
    out, hint = tmp_path / "out", f"huggingface-cli download {HUB_ID} --local-dir DIR"
    line = _convert_fails(capsys, "hf_to_orbax.py", "--hf-llava", HUB_ID, "--out", out)
    assert f"no such llava-hf folder (--hf-llava): {HUB_ID} (if" in line and hint in line and "pass DIR)" in line
    line = _convert_fails(capsys, "hf_to_orbax.py", "--clip", tmp_path / "clip", "--llm", tmp_path, "--out", out)
    assert line == f"hf_to_orbax: error: no such CLIP folder (--clip): {tmp_path / 'clip'}"
    line = _convert_fails(capsys, "hf_to_orbax.py", "--clip", tmp_path, "--llm", tmp_path, "--projector", HUB_ID,
                          "--out", out)
    assert "no such projector weights file (--projector)" in line and "pass DIR/mm_projector.bin)" in line
    line = _convert_fails(capsys, "hf_to_orbax.py", "--clip", tmp_path, "--llm", tmp_path, "--projector", tmp_path,
                          "--out", out)
    assert line == f"hf_to_orbax: error: projector weights file (--projector) {tmp_path} is a folder, not a file"
    line = _convert_fails(capsys, "hf_to_orbax.py", "--hf-llava", tmp_path, "--llm", tmp_path, "--out", out)
    assert "--hf-llava cannot be combined with --clip/--llm" in line
    line = _convert_fails(capsys, "orbax_to_hf.py", "--ckpt", HUB_ID, "--out", out)
    assert f"no such checkpoint (a llava-jax model folder or training workdir): {HUB_ID}" in line and hint in line
    line = _convert_fails(capsys, "gguf_to_hf.py", "--gguf", tmp_path / "x.gguf", "--out", out)
    assert line == f"gguf_to_hf: error: no such GGUF file (--gguf): {tmp_path / 'x.gguf'}"
    assert len(platform_chosen) == 7 and not out.exists()
    with pytest.raises(validate.NotAFolder):
        _convert_main("orbax_to_hf.py")(["--ckpt", HUB_ID, "--out", str(out), "--debug"])


def test_unknown_config_file_and_argument(capsys, tmp_path):
    line = _fails(capsys, ["train", "--config", "configs/nope.py:stage2", "--workdir", str(tmp_path)], "train")
    assert line == ("llava-jax train: error: config file 'configs/nope.py' not found (from --config "
                    "'configs/nope.py:stage2'); the configs are in the repository's configs/ folder, "
                    "e.g. configs/tiny.py:stage2")
    line = _fails(capsys, ["train", "--config", f"{TINY}:stage3", "--workdir", str(tmp_path)], "train")
    assert line == (f"llava-jax train: error: --config={TINY}:stage3: unknown config argument 'stage3'; "
                    "expected one of ('stage1', 'stage2')")
    line = _fails(capsys, ["info", "--config", f"{TINY}:stage3"], "info")
    assert "unknown config argument 'stage3'" in line
    line = _fails(capsys, ["aot", "--config", "configs/nope.py", "--topology", "v5e:2x4"], "aot")
    assert "config file 'configs/nope.py' not found" in line


def test_config_key_typo_says_did_you_mean(capsys, tmp_path):
    line = _fails(capsys, ["train", "--config", f"{TINY}:stage2", "--workdir", str(tmp_path),
                           "--config.optim.lrr=1"], "train")
    assert line == ('llava-jax train: error: --config.optim.lrr: no such config key; did you mean "lr" instead '
                    'of "lrr"? (every key and its default: llava_jax/train/defaults.py)')


def test_config_that_cannot_run_here_is_refused_before_any_work(capsys, tmp_path):
    workdir = tmp_path / "run"
    line = _fails(capsys, ["train", "--config", f"{TINY}:stage2", "--workdir", str(workdir),
                           "--config.max_length=4", "--config.data.template=vicuna"], "train")
    assert "max_length=4 leaves no room for text" in line and "set --config.max_length=128" in line
    assert "data.template='vicuna' is not a conversation template" in line
    assert not workdir.exists()


def test_debug_flag_and_environment_show_the_traceback(capsys, tmp_path, monkeypatch):
    argv = ["chat", "--ckpt", str(tmp_path / "nope"), "--prompt", "hi"]
    with pytest.raises(validate.NotAFolder):
        cli.main(argv + ["--debug"])
    monkeypatch.setenv("LLAVA_JAX_DEBUG", "1")
    with pytest.raises(validate.NotAFolder):
        cli.main(argv)
    monkeypatch.setenv("LLAVA_JAX_DEBUG", "0")
    assert cli.main(argv) == 2


def test_internal_errors_keep_their_traceback(monkeypatch):
    import llava_jax.info

    def broken(argv):
        raise RuntimeError("a bug")

    monkeypatch.setattr(llava_jax.info, "main", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["info", "--config", TINY])


def test_undecodable_image_400_names_no_python_object():
    from llava_jax.infer.server import ApiError, Limits, _decode_image

    url = "data:image/png;base64," + base64.b64encode(b"these bytes are not an image").decode()
    with pytest.raises(ApiError) as info:
        _decode_image(url, "messages[0].content[1]", Limits())
    assert info.value.status == 400 and info.value.code == "invalid_image"
    assert "BytesIO" not in info.value.message and " at 0x" not in info.value.message
    assert "the data is not an image this server can decode" in info.value.message


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny one-step training run through the CLI, then the same command again -> (workdir, stderr of each)."""
    workdir = tmp_path_factory.mktemp("run")
    argv = ["train", "--config", f"{TINY}:stage2", "--workdir", str(workdir), "--config.total_steps=1",
            "--noprogress"]
    errs = []
    for _ in range(2):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert cli.main(argv) == 0
        errs.append(err.getvalue())
    return workdir, errs


def test_train_says_where_the_model_is_and_a_rerun_says_it_is_done(trained):
    workdir, (first, again) = trained
    assert first.strip().splitlines()[-1] == (f"llava-jax train: finished step 1 of 1: the model is {workdir} "
                                              f"(llava-jax chat --ckpt {workdir})")
    assert f"llava-jax train: already done: {workdir} holds step 1 of 1" in again
    assert again.strip().splitlines()[-1] == f"llava-jax train: the model is {workdir} (llava-jax chat --ckpt {workdir})"


def test_model_load_logs_no_metadata_warning(trained, caplog):
    from llava_jax.checkpoint import load_pretrained

    with caplog.at_level(logging.WARNING):
        load_pretrained(str(trained[0]))  # a workdir: its latest step's params item
    assert not [r for r in caplog.records if "_CHECKPOINT_METADATA" in r.getMessage()
                and all(f.filter(r) for f in logging.getLogger("absl").filters)]


def test_batch_smaller_than_the_devices_is_one_line_in_a_real_run(tmp_path):
    """The issue's case on 8 devices (a fresh interpreter: the device count is fixed at JAX start)."""
    proc = subprocess.run([sys.executable, "-m", "llava_jax.cli", "train", "--config", f"{TINY}:stage2",
                           "--workdir", str(tmp_path / "w"), "--config.mesh.fsdp=8"],
                          env=subprocess_env(8), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "llava-jax train: error: global_batch_size=4 is not divisible by the 8 data-parallel devices "
        "(mesh data=1 x fsdp=8); set --config.global_batch_size=8, or --config.mesh.fsdp=4 --config.mesh.tensor=2")
    assert "Traceback" not in proc.stderr and "IndivisibleError" not in proc.stderr


@pytest.mark.skipif(cli.tpu_present() or cli.gpu_present(), reason="checks a machine without accelerators")
def test_cpu_only_machine_runs_quietly_without_jax_platforms(tmp_path):
    env = subprocess_env(1)
    del env["JAX_PLATFORMS"]
    proc = subprocess.run([sys.executable, "-m", "llava_jax.cli", "info", "--config", f"{TINY}:stage1"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.strip() == "", proc.stderr[-3000:]
    # a convert script given a hub id: one line, no traceback, no TPU probing, no network
    proc = subprocess.run([sys.executable, "convert/hf_to_orbax.py", "--hf-llava", HUB_ID, "--out", str(tmp_path)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
    assert proc.stderr.startswith(f"hf_to_orbax: error: no such llava-hf folder (--hf-llava): {HUB_ID}")


def test_sigterm_stops_serve_cleanly(trained):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llava_jax.cli", "serve", "--ckpt", str(trained[0]),
                             "--port", str(port)], env=subprocess_env(1), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        line = proc.stdout.readline()
        while "serving" not in line and time.time() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
        assert "serving" in line, proc.stderr.read()[-3000:] if proc.poll() is not None else line
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM received" not in err and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "llava-jax serve: stopped"


def test_launch_checks_the_config_before_starting_the_workers(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_tpu", REPO / "launch" / "tpu.py")
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    common = ["train", "--name", "pod", "--zone", "z", "--config", f"{TINY}:stage2", "--workdir", "gs://b/run",
              "--dry-run"]
    assert launch.main(common + ["--accelerator-type", "v5litepod-8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("launch/tpu.py train: error: global_batch_size=4 is not divisible by the 8 data-parallel "
                   "devices (mesh data=1 x fsdp=8); set --config.global_batch_size=8, or --config.mesh.fsdp=4 "
                   "--config.mesh.tensor=2")
    assert launch.main(common + ["--accelerator-type", "v5litepod-8", "--", "--config.mesh.fsdp=4",
                                 "--config.mesh.tensor=2"]) == 0
    assert "llava_jax.cli train" in capsys.readouterr().out
    assert launch.main(common + ["--", "--config.optim.lrr=1"]) == 2
    assert "--config.optim.lrr: no such config key" in capsys.readouterr().err
