"""configs/llava_v1_5_{7b,13b}_lora.py: the reference's LoRA recipe (scripts/v1_5/finetune_lora.sh)
on the LLaVA-1.5 shapes, loadable through `llava-jax train`'s flag parser."""
import os

import pytest
from absl import flags
from ml_collections import config_flags

from llava_jax.config_files import load_config
from llava_jax.models import lora as lora_lib
from llava_jax.models.config import config_from_any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("size, hidden", [("7b", 4096), ("13b", 5120)])
@pytest.mark.parametrize("arg, base_dtype", [("", "bfloat16"), ("int8", "int8"), ("fp32", "float32")])
def test_lora_recipe(size, hidden, arg, base_dtype):
    path = os.path.join(REPO, "configs", f"llava_v1_5_{size}_lora.py")
    spec = f"{path}:{arg}" if arg else path
    c = load_config(spec)
    lora = lora_lib.from_config(c.lora)
    assert (lora.rank, lora.alpha, lora.dropout) == (128, 256.0, 0.05)
    assert lora.targets == lora_lib.ALL_TARGETS and lora.train_projector and lora.base_dtype == base_dtype
    assert (c.optim.lr, c.optim.projector_lr, c.optim.weight_decay, c.optim.warmup_ratio) == (2e-4, 2e-5, 0.0, 0.03)
    assert (c.stage, c.global_batch_size, c.num_epochs, c.optim.schedule) == (2, 128, 1, "cosine")
    model = config_from_any(c.model)
    assert model.text.hidden_size == hidden and model.projector_type == "mlp2x_gelu"
    lora.check_shapes(model.text)
    argv = ["prog", f"--config={spec}", "--config.lora.rank=64"]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values, sys_argv=argv)
    values(argv)
    assert values.config.lora.rank == 64


def test_unknown_argument_is_refused():
    with pytest.raises(ValueError, match="unknown config argument 'int4'"):
        load_config(os.path.join(REPO, "configs", "llava_v1_5_7b_lora.py") + ":int4")
