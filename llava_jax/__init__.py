"""llava-jax: LLaVA in JAX/Flax NNX."""
from flax import nnx as _nnx

# Parameters carry logical axis names as metadata only; they are placed on a mesh explicitly
# (abstract init, then jit with out_shardings), never eagerly at construction.
_nnx.use_eager_sharding(False)

__version__ = "0.1.0"


def load_pretrained(path, **kwargs):
    """Load a model folder or training workdir -> (model, config). See llava_jax.checkpoint."""
    from llava_jax.checkpoint import load_pretrained as _load

    return _load(path, **kwargs)
