"""The pure, jittable steps of training and evaluation: losses, gradients, sums.

Steps return sums and token counts; the host normalises them (so that
batches and devices add up exactly).
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mqa_flax.state import TrainState


def token_losses(logits_BTV: jax.Array, targets_BT: jax.Array,
                 label_smoothing: float) -> tuple[jax.Array, jax.Array]:
  """Label-smoothed loss and plain negative log-likelihood per token, [B, T]."""
  lse = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit = jnp.take_along_axis(logits_BTV, targets_BT[..., None], -1)[..., 0]
  nll = lse - target_logit
  smooth = lse - logits_BTV.mean(-1)  # Cross-entropy with the uniform distribution.
  return (1 - label_smoothing) * nll + label_smoothing * smooth, nll


def _forward_sums(graphdef, params, batch, label_smoothing, rngs=None):
  model = nnx.merge(graphdef, params)
  logits = model(batch['inputs'], batch['targets'],
                 inputs_segmentation=batch.get('inputs_segmentation'),
                 targets_segmentation=batch.get('targets_segmentation'),
                 inputs_position=batch.get('inputs_position'),
                 targets_position=batch.get('targets_position'), rngs=rngs)
  loss, nll = token_losses(logits, batch['targets'], label_smoothing)
  weights = (batch['targets'] != 0).astype(jnp.float32)
  correct = (logits.argmax(-1) == batch['targets']) * weights
  return (loss * weights).sum(), {'nll_sum': (nll * weights).sum(),
                                  'tokens': weights.sum(),
                                  'correct': correct.sum()}


def _mean_loss(params, graphdef, batch, label_smoothing, dropout_key=None):
  """What training minimises, the mean per-token loss, and (its sum, sums)."""
  rngs = None if dropout_key is None else nnx.Rngs(dropout=dropout_key)
  loss_sum, aux = _forward_sums(graphdef, params, batch, label_smoothing, rngs)
  return loss_sum / jnp.maximum(aux['tokens'], 1.0), (loss_sum, aux)


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
               label_smoothing: float) -> tuple[TrainState, dict]:
  """One optimizer step on the mean per-token loss; returns sums for logging.

  `rng` (the run's dropout key, folded with the step) is an argument rather
  than a constant, so that runs with different seeds share one executable.
  """
  dropout_key = jax.random.fold_in(rng, state.step)
  grads, (loss_sum, aux) = jax.grad(_mean_loss, has_aux=True)(
      state.params, graphdef, batch, label_smoothing, dropout_key)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
  grad_norm = jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(grads)))
  return new, dict(aux, loss_sum=loss_sum, grad_norm=grad_norm)


def eval_step(params: nnx.State, batch: dict[str, jax.Array], *,
              graphdef: nnx.GraphDef, label_smoothing: float) -> dict:
  """Summed loss, NLL, token count and correct predictions of one batch."""
  loss_sum, aux = _forward_sums(graphdef, params, batch, label_smoothing)
  return dict(aux, loss_sum=loss_sum)


def gradient_gap(params: nnx.State, batch: dict[str, jax.Array], *,
                 graphdef: nnx.GraphDef, reference: nnx.GraphDef,
                 label_smoothing: float) -> dict:
  """How far `graphdef`'s mean loss on `batch` and its gradients (no dropout)
  are from those of `reference`, a graph of the same parameters computed
  another way: both losses, and each parameter array's relative difference
  |g - g_ref| / |g_ref| (2-norms over the array)."""
  def loss_and_grads(g):
    return jax.value_and_grad(lambda p: _mean_loss(p, g, batch, label_smoothing)[0])(params)

  def relative(g, ref):  # Both zero: no difference.
    return jnp.linalg.norm(g - ref) / jnp.maximum(jnp.linalg.norm(ref),
                                                  jnp.finfo(jnp.float32).tiny)

  (loss, grads), (ref_loss, ref_grads) = loss_and_grads(graphdef), loss_and_grads(reference)
  return dict(loss=loss, reference_loss=ref_loss,
              relative=jax.tree.map(relative, grads, ref_grads))
