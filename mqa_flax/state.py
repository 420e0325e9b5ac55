"""The train state: parameters, optimizer, schedule, and their shapes.

`TrainState` holds float32 parameters and the optimizer state. Its
abstract form (`abstract_state`, shapes with replicated shardings, nothing
allocated) is what checkpoints restore into; `create_state` initialises it
directly in that layout. Decoding and tools that need only the parameters
use `abstract_params`.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mqa_flax.config import ModelConfig
from mqa_flax.errors import UserError
from mqa_flax.model import Transformer, abstract_model


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  """What a train checkpoint holds besides the data position."""

  step: jax.Array  # Completed steps, int32 [].
  params: nnx.State
  opt_state: optax.OptState


def make_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to `opt.learning_rate`, then rsqrt or cosine decay."""
  peak, warmup = opt.learning_rate, max(opt.warmup_steps, 1)
  if opt.schedule == 'rsqrt':
    # lr(s) = peak * min(s / w, sqrt(w / s)) at s = step + 1: a linear rise
    # to peak at s = w, then peak * sqrt(w / s), i.e. proportional to
    # 1 / sqrt(s) (the Transformer's schedule, with its d_model**-0.5 folded
    # into peak). The two branches meet at s = w.
    return lambda step: peak * jnp.minimum(
        (step + 1) / warmup, jnp.sqrt(warmup / jnp.maximum(step + 1, 1)))
  if opt.schedule == 'cosine':  # Shifted like rsqrt: the first step learns.
    cosine = optax.warmup_cosine_decay_schedule(0.0, peak, warmup,
                                                max(total_steps, warmup + 1))
    return lambda step: cosine(step + 1)
  raise UserError(f"opt.schedule={opt.schedule!r}; expected 'rsqrt' or 'cosine'")


def make_optimizer(opt: ml_collections.ConfigDict,
                   total_steps: int) -> optax.GradientTransformation:
  """Adafactor (the paper's codebase) or AdamW, after global-norm clipping."""
  lr = make_schedule(opt, total_steps)
  if opt.optimizer == 'adafactor':
    tx = optax.adafactor(lr)
  elif opt.optimizer == 'adamw':
    tx = optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=1e-9,
                     weight_decay=opt.weight_decay)
  else:
    raise UserError(f"opt.optimizer={opt.optimizer!r}; expected 'adafactor' or 'adamw'")
  return optax.chain(optax.clip_by_global_norm(opt.grad_clip), tx) if opt.grad_clip else tx


def init_params(cfg: ModelConfig, seed: jax.Array) -> nnx.State:
  """The parameters a run with `seed` starts from (traceable)."""
  return nnx.state(Transformer(cfg, rngs=nnx.Rngs(params=jax.random.key(seed))), nnx.Param)


def _init_fn(cfg: ModelConfig, tx: optax.GradientTransformation):
  def init(seed):  # Traced, so that every seed shares one executable.
    params = init_params(cfg, seed)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  return init


def _replicated(tree: Any, mesh: Mesh | None) -> Any:
  sharding = NamedSharding(mesh or Mesh(np.array(jax.devices()), ('data',)), P())
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def abstract_params(cfg: ModelConfig,
                    mesh: Mesh | None = None) -> tuple[nnx.GraphDef, nnx.State]:
  """The model's graph and the replicated shapes of its parameters, built
  without allocating (for restoring the parameters alone, to decode)."""
  graphdef, shapes = abstract_model(cfg)
  return graphdef, _replicated(shapes, mesh)


def abstract_state(cfg: ModelConfig, tx: optax.GradientTransformation,
                   mesh: Mesh | None = None) -> tuple[nnx.GraphDef, TrainState]:
  """The graph and the replicated shapes of a train state (for restoring)."""
  shapes = jax.eval_shape(_init_fn(cfg, tx), jnp.zeros((), jnp.int32))
  return abstract_model(cfg)[0], _replicated(shapes, mesh)


def create_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int,
                 mesh: Mesh) -> tuple[nnx.GraphDef, TrainState]:
  """Initialises parameters and optimizer state directly in replicated layout."""
  graphdef, shapes = abstract_state(cfg, tx, mesh)
  shardings = jax.tree.map(lambda x: x.sharding, shapes)
  init = jax.jit(_init_fn(cfg, tx), out_shardings=shardings)
  return graphdef, init(jnp.asarray(seed, jnp.int32))


