"""`llava-jax chat`: one-shot --prompt answers equal generate(); interactive turns, commands, EOF."""
import io
import os
import subprocess
import sys

import pytest
from PIL import Image

from llava_jax.infer import chat
from llava_jax.testing.checkpoints import expected_answer, shared_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt():
    return shared_tiny_checkpoint()


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    import skimage.data

    path = str(tmp_path_factory.mktemp("img") / "astronaut.png")
    Image.fromarray(skimage.data.astronaut()).resize((96, 80)).save(path)
    return path


def test_prompt_mode_answers_once_equal_to_generate(ckpt, photo, capsys):
    rc = chat.main(["--ckpt", ckpt, "--image", photo, "--prompt", "What is shown in the image?",
                    "--max-new-tokens", "16"])
    assert rc == 0
    out = capsys.readouterr().out
    expected = expected_answer(ckpt, "What is shown in the image?", Image.open(photo), max_new_tokens=16)
    assert expected.strip() and out == expected + "\n"


def test_interactive_multi_turn_reset_image_and_eof(ckpt, photo, capsys, monkeypatch):
    lines = ["What is shown in the image?", "Describe the colour.", "/image /no/such/file.png", "/reset",
             "Describe the colour.", "/bogus", f"/image {photo}", "What is shown in the image?"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    assert chat.main(["--ckpt", ckpt, "--max-new-tokens", "12"]) == 0
    captured = capsys.readouterr()
    answers = [chunk.split("\n", 1)[0] for chunk in captured.out.split("ASSISTANT: ")[1:]]
    assert len(answers) == 4
    # No image given: the first turn is text-only; the second sees the first turn as history.
    assert answers[0] == expected_answer(ckpt, "What is shown in the image?", max_new_tokens=12)
    fresh = expected_answer(ckpt, "Describe the colour.", max_new_tokens=12)
    assert answers[1] != fresh  # history changes the answer
    assert answers[2] == fresh  # after /reset there is no history
    assert answers[3] == expected_answer(ckpt, "What is shown in the image?", Image.open(photo), 12)
    assert "image file not found: /no/such/file.png" in captured.err
    assert "unknown command '/bogus'" in captured.err
    assert captured.out.endswith("USER: \n")  # EOF ends the session cleanly


@pytest.mark.slow  # the same as the --prompt test above, plus a Python start-up
def test_cli_subprocess(ckpt, photo):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "llava_jax.cli", "chat", "--ckpt", ckpt, "--image", photo,
                           "--prompt", "What is shown in the image?", "--max-new-tokens", "16"],
                          cwd=root, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == expected_answer(ckpt, "What is shown in the image?", Image.open(photo), 16) + "\n"
