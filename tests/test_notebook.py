"""notebooks/colab_tpu_inference.ipynb: its code cells run on CPU against a tiny llava-hf folder.

Cells tagged `skip-in-test` (the shell installs) are skipped; after the cell tagged `parameters` the
test injects its own values (local llava-hf folder, output folder, local image, float32), as
papermill does.
"""
import contextlib
import io
import json
import os

import pytest
from PIL import Image

from llava_jax.testing.checkpoints import expected_answer, tiny_chat_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "colab_tpu_inference.ipynb")


def code_cells():
    with open(NOTEBOOK) as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            yield "".join(cell["source"]), set(cell.get("metadata", {}).get("tags", []))


@pytest.fixture(scope="module")
def tiny_hf_folder(tmp_path_factory):
    """A llava-hf folder as the hub has it: config.json, model.safetensors, tokenizer files."""
    from llava_jax.testing.hf_reference import hf_llava
    from llava_jax.testing.tokenizer import save_llama_tokenizer

    folder = str(tmp_path_factory.mktemp("llava-hf-tiny"))
    hf_llava(tiny_chat_config(), seed=1).save_pretrained(folder)
    save_llama_tokenizer(folder)
    return folder


def test_skipped_cells_are_only_shell_installs():
    skipped = [src for src, tags in code_cells() if "skip-in-test" in tags]
    assert skipped, "the install cell should be tagged skip-in-test"
    for src in skipped:
        for line in src.splitlines():
            assert not line.strip() or line.lstrip().startswith(("!", "%", "#")), line


def run_notebook(overrides: dict) -> tuple:
    """Run the code cells but the skipped ones, `overrides` set after the parameters cell ->
    (the notebook's variables, what it printed)."""
    namespace = {"__name__": "__notebook__"}
    out = io.StringIO()
    seen_parameters = False
    for src, tags in code_cells():
        if "skip-in-test" in tags:
            continue
        with contextlib.redirect_stdout(out):
            exec(compile(src, NOTEBOOK, "exec"), namespace)
        if "parameters" in tags:
            namespace.update(overrides)
            seen_parameters = True
    assert seen_parameters
    return namespace, out.getvalue()


def test_notebook_runs_on_cpu_with_a_tiny_checkpoint(tiny_hf_folder, tmp_path):
    import skimage.data

    image_path = str(tmp_path / "rocket.jpg")
    Image.fromarray(skimage.data.rocket()).resize((80, 120)).save(image_path)
    overrides = dict(HF_DIR=tiny_hf_folder, REPO_DIR=ROOT, CKPT_DIR=str(tmp_path / "ckpt"), IMAGE_PATH=image_path,
                     DTYPE="float32", PARAM_DTYPE="float32", MAX_NEW_TOKENS=10)
    namespace, printed = run_notebook(overrides)
    # The converted folder answers exactly what generate() gives on it, and the answer was streamed.
    answer = namespace["answer"]
    assert answer == expected_answer(overrides["CKPT_DIR"], "What is shown in this image?", Image.open(image_path),
                                     max_new_tokens=10)
    assert f"ASSISTANT: {answer}\n" in printed
    assert isinstance(namespace["follow_up"], str)
    assert "is split as" in printed
