"""One stage-2 train step gives the same loss and parameters on every mesh as on one device.

All meshes run in ONE subprocess with 8 forced CPU devices (XLA_FLAGS must be set before jax loads).
"""
import json

from llava_jax.testing.processes import run_python

SCRIPT = r"""
import json
import jax, numpy as np
import llava_jax
from llava_jax import sharding
from llava_jax.models.config import TextConfig
from llava_jax.recipes.tiny import tiny_llava_config
from llava_jax.testing.batches import make_batch
from llava_jax.train import step as S
from llava_jax.train.defaults import base_config
from llava_jax.train.setup import train_setup

assert jax.device_count() == 8, jax.devices()
# Head counts and widths divide a tensor axis of 4 and an fsdp axis of 8.
text = TextConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=8,
                  num_kv_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6)
cfg = tiny_llava_config(text=text)
c = base_config(cfg)
c.optim.lr = 1e-3
c.optim.projector_lr = 3e-3
c.optim.warmup_ratio = 0.0
c.optim.weight_decay = 0.1
# A large eps keeps Adam's first update linear in the gradient: with eps=1e-8 it is lr*sign(g), so
# gradients that are rounding noise around 0 would flip sign between reduction orders.
c.optim.eps = 1e-3
batch = make_batch(cfg, 8, 24, seed=3, packed_rows=3)

one_device = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
initial = jax.device_get(train_setup(c, cfg, one_device, 10).init_state())

def run(mesh):
    setup = train_setup(c, cfg, mesh, 10)
    state = jax.device_put(initial, setup.layout.shardings)
    with jax.set_mesh(mesh):
        bsh = sharding.tree_batch_shardings(mesh, batch)
        gbatch = jax.device_put(batch, bsh)
        step = setup.jit_train_step(bsh)
        new, metrics = step(state, gbatch)
        # parameters really are split over the mesh
        kernel = new["params"]["language_model"]["layers"]["mlp"]["up_proj"]["kernel"]
        shards = {tuple(s.data.shape) for s in kernel.addressable_shards}
    full = jax.device_get(S.merged_params(new))
    return float(metrics["loss"]), full, sorted(shards)

ref_loss, ref_params, _ = run(one_device)
out = {"ref_loss": ref_loss, "meshes": {}}
for shape in [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]:
    loss, params, shards = run(sharding.make_mesh(*shape))
    worst = 0.0
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        worst = max(worst, float(np.max(np.abs(a - b) / (np.abs(b) + 1e-3))))
    out["meshes"][str(shape)] = {"loss": loss, "worst_rel": worst, "shards": shards}
print("RESULT" + json.dumps(out))
"""


def test_step_matches_single_device_on_all_meshes():
    stdout = run_python(SCRIPT, num_devices=8, timeout=400)
    result = json.loads(stdout.split("RESULT", 1)[1])
    ref = result["ref_loss"]
    assert ref > 0
    for mesh, r in result["meshes"].items():
        assert abs(r["loss"] - ref) <= 1e-5 * abs(ref), (mesh, r["loss"], ref)
        assert r["worst_rel"] <= 1e-5, (mesh, r["worst_rel"])
    # (D, F) = (64, 96) up_proj per layer: fsdp splits D, tensor splits F
    assert result["meshes"]["(1, 8, 1)"]["shards"] == [[2, 8, 96]]
    assert result["meshes"]["(1, 2, 4)"]["shards"] == [[2, 32, 24]]
    assert result["meshes"]["(8, 1, 1)"]["shards"] == [[2, 64, 96]]
