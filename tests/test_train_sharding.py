"""The mesh and the logical-axis rules table."""
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import PartitionSpec as P

from dms_jax import sharding as shd


def test_mesh_must_match_the_device_count():
    assert jax.device_count() == 8
    mesh = shd.make_mesh((2, -1, 1))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(shd.MeshError, match="needs 4 devices but 8 are available"):
        shd.make_mesh((2, 2, 1))
    with pytest.raises(shd.MeshError, match="not divisible"):
        shd.make_mesh((3, -1, 1))
    with pytest.raises(shd.MeshError, match="3 entries"):
        shd.make_mesh((8, 1))
    assert dict(shd.make_mesh((1, 1, 1), devices=jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1, "tensor": 1}


def test_parameter_specs_follow_the_rules_table():
    mesh = shd.make_mesh((2, 2, 2))
    params = {
        "embed.embedding": jnp.zeros((64, 32)),
        "layers.0.attn.q_proj.kernel": jnp.zeros((32, 32)),
        "layers.0.attn.k_proj.kernel": jnp.zeros((32, 16)),
        "layers.0.attn.q_proj.bias": jnp.zeros((32,)),
        "layers.0.attn.o_proj.kernel": jnp.zeros((32, 32)),
        "layers.0.attn.dms_proj.kernel": jnp.zeros((32, 2)),
        "layers.0.mlp.down_proj.kernel": jnp.zeros((64, 32)),
        "layers.0.input_norm.scale": jnp.zeros((32,)),
        "lm_head.kernel": jnp.zeros((32, 63)),  # 63 not divisible by tensor=2: replicated dim
    }
    specs = {k: s.spec for k, s in shd.param_shardings(params, mesh).items()}
    assert specs["embed.embedding"] == P("tensor", "fsdp")
    assert specs["layers.0.attn.q_proj.kernel"] == P("fsdp", "tensor")
    assert specs["layers.0.attn.k_proj.kernel"] == P("fsdp", "tensor")
    assert specs["layers.0.attn.q_proj.bias"] == P("tensor")
    assert specs["layers.0.attn.o_proj.kernel"] == P("tensor", "fsdp")
    assert specs["layers.0.attn.dms_proj.kernel"] == P("fsdp", None)
    assert specs["layers.0.mlp.down_proj.kernel"] == P("tensor", "fsdp")
    assert specs["layers.0.input_norm.scale"] == P(None)
    assert specs["lm_head.kernel"] == P("fsdp", None)
    tokens = shd.logical_sharding(shd.ACTIVATION_AXES["tokens"], mesh, (8, 16))
    assert tokens.spec == P(("data", "fsdp"), None)


def test_optimizer_state_mirrors_parameter_shardings():
    mesh = shd.make_mesh((1, 4, 2))
    params = {"layers.0.mlp.up_proj.kernel": jnp.zeros((16, 32)), "final_norm.scale": jnp.zeros((16,))}
    p_sh = shd.param_shardings(params, mesh)
    state = jax.eval_shape(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)).init, params)
    sh = shd.mirrored_shardings(state, params, p_sh, mesh)
    adam = sh[1][0]
    assert adam.mu["layers.0.mlp.up_proj.kernel"].spec == P("fsdp", "tensor")
    assert adam.nu["final_norm.scale"].spec == P(None)
    assert adam.count.spec == P()
