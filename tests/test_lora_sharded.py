"""LoRA on 8 simulated devices: adapters are created in their shards (lora_a split like its
kernel's input axis, lora_b like its output axis), only adapters + projector carry optimizer state,
and one step (with adapter dropout and an int8 base) gives the one-device loss and parameters."""
import json

from llava_jax.testing.processes import run_python

SCRIPT = r"""
import json
import jax, numpy as np
from llava_jax import sharding
from llava_jax.models.config import TextConfig
from llava_jax.models.lora import LoraConfig
from llava_jax.recipes.tiny import tiny_llava_config
from llava_jax.testing.batches import make_batch
from llava_jax.train.defaults import base_config
from llava_jax.train.setup import train_setup

assert jax.device_count() == 8
text = TextConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=8,
                  num_kv_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6)
cfg = tiny_llava_config(text=text)
lora = LoraConfig(rank=8, alpha=16, dropout=0.1, base_dtype="int8")
c = base_config(cfg)
c.optim.lr, c.optim.projector_lr, c.optim.warmup_ratio, c.optim.eps = 1e-3, 3e-3, 0.0, 1e-3
batch = make_batch(cfg, 8, 24, seed=3, packed_rows=3)
one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
initial = jax.device_get(train_setup(c, cfg, one, 10, lora=lora).init_state())
# B starts at zero; nonzero values make every adapter take part in the forward pass.
rng = np.random.default_rng(0)
initial["params"] = jax.tree_util.tree_map_with_path(
    lambda p, x: rng.normal(size=x.shape).astype(x.dtype) * 0.05 if "lora_b" in jax.tree_util.keystr(p) else x,
    initial["params"])

def run(mesh):
    setup = train_setup(c, cfg, mesh, 10, lora=lora)  # stage 2, seed 0: dropout_seed 0
    state = jax.device_put(initial, setup.layout.shardings)
    with jax.set_mesh(mesh):
        bsh = sharding.tree_batch_shardings(mesh, batch)
        new, metrics = setup.jit_train_step(bsh)(state, jax.device_put(batch, bsh))
    q = new["params"]["language_model"]["layers"]["self_attn"]["q_proj"]
    info = {"lora_a": str(q["lora_a"].sharding.spec), "lora_b": str(q["lora_b"].sharding.spec),
            "a_shards": sorted({tuple(s.data.shape) for s in q["lora_a"].addressable_shards}),
            "b_shards": sorted({tuple(s.data.shape) for s in q["lora_b"].addressable_shards}),
            "trainable": sorted(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(new["params"])),
            "opt_leaves": len([x for x in jax.tree.leaves(new["opt_state"]) if getattr(x, "ndim", 0) > 0]),
            "base_dtype": str(new["frozen"]["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"].dtype)}
    return float(metrics["loss"]), jax.device_get(new["params"]), info

ref_loss, ref_params, _ = run(one)
out = {"ref_loss": ref_loss, "meshes": {}}
loss, params, info = run(sharding.make_mesh(2, 2, 2))
worst = max(float(np.max(np.abs(a - b) / (np.abs(b) + 1e-3)))
            for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))
out["meshes"]["(2, 2, 2)"] = dict(info, loss=loss, worst_rel=worst)
# Another mesh's layout (no step): B's output axis over a tensor axis of 4.
layout = train_setup(c, cfg, sharding.make_mesh(1, 2, 4), 10, lora=lora).layout
b = layout.abstract["params"]["language_model"]["layers"]["self_attn"]["q_proj"]["lora_b"]
out["b_shard_1_2_4"] = list(b.sharding.shard_shape(b.shape))
print("RESULT" + json.dumps(out))
"""


def test_lora_step_on_8_devices_matches_one_device():
    result = json.loads(run_python(SCRIPT, num_devices=8, timeout=400).split("RESULT", 1)[1])
    ref = result["ref_loss"]
    for mesh, r in result["meshes"].items():
        assert abs(r["loss"] - ref) <= 1e-5 * abs(ref), (mesh, r["loss"], ref)
        # Relative to |value| + 1e-3; the fsdp-split contractions sum in another order than one device.
        assert r["worst_rel"] <= 5e-5, (mesh, r["worst_rel"])
        assert r["base_dtype"] == "int8"
        # 7 projections x (A, B) + the projector's 2 kernels and 2 biases; Adam's mu and nu for each
        assert len(r["trainable"]) == 18 and all("lora" in k or "projector" in k for k in r["trainable"])
        assert r["opt_leaves"] == 2 * 18
    # q_proj (64 -> 64), rank 8, 2 layers: A (2, 64, 8) splits its input over fsdp, B (2, 8, 64) its output over tensor
    assert result["meshes"]["(2, 2, 2)"]["a_shards"] == [[2, 32, 8]]
    assert result["meshes"]["(2, 2, 2)"]["b_shards"] == [[2, 8, 32]]
    assert result["b_shard_1_2_4"] == [2, 8, 16]
