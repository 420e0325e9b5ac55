"""Training: model and optimizer, a jitted data-parallel step, eval, checkpoints.

Parameters are float32 and replicated on every device; batches are sharded
over the one mesh axis `data` (with several processes, each feeds its own
rows). Sub-layers compute in `config.model.dtype`. The loop dispatches step
i before fetching step i-1's metrics, so the host never waits for the device
except at logging, evaluation and checkpoint boundaries.
"""

import dataclasses
import functools
import json
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mqa_flax import bleu as bleu_lib
from mqa_flax import checkpoint as ckpt_lib
from mqa_flax import data
from mqa_flax import inference
from mqa_flax import metrics as metrics_lib
from mqa_flax import summary
from mqa_flax.config import ModelConfig
from mqa_flax.errors import Stopped, UserError
from mqa_flax.model import Transformer


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  step: jax.Array  # Completed steps, int32 [].
  params: nnx.State
  opt_state: optax.OptState


def make_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to `opt.learning_rate`, then rsqrt or cosine decay."""
  peak, warmup = opt.learning_rate, max(opt.warmup_steps, 1)
  if opt.schedule == 'rsqrt':
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


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
               label_smoothing: float) -> tuple[TrainState, dict]:
  """One optimizer step on the mean per-token loss; returns sums for logging.

  `rng` (the run's dropout key, folded with the step) is an argument rather
  than a constant, so that runs with different seeds share one executable.
  """
  dropout_key = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    rngs = nnx.Rngs(dropout=dropout_key)
    loss_sum, aux = _forward_sums(graphdef, params, batch, label_smoothing, rngs)
    return loss_sum / jnp.maximum(aux['tokens'], 1.0), (loss_sum, aux)

  grads, (loss_sum, aux) = jax.grad(loss_fn, has_aux=True)(state.params)
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


def _init_fn(cfg: ModelConfig, tx: optax.GradientTransformation):
  def init(seed):  # Traced, so that every seed shares one executable.
    params = nnx.state(Transformer(cfg, rngs=nnx.Rngs(params=jax.random.key(seed))),
                       nnx.Param)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  return init


def _replicated(tree: Any, mesh: Mesh | None) -> Any:
  sharding = NamedSharding(mesh or Mesh(np.array(jax.devices()), ('data',)), P())
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def abstract_model(cfg: ModelConfig,
                   mesh: Mesh | None = None) -> tuple[nnx.GraphDef, nnx.State]:
  """The model's graph and the replicated shapes of its parameters, built
  without allocating (for restoring the parameters alone, to decode)."""
  graphdef, shapes = nnx.split(
      nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
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


def training_length(config: ml_collections.ConfigDict,
                    steps_per_epoch: int) -> tuple[int, int]:
  """(train steps, warmup steps) from the config and the data.

  `num_epochs > 0` sets the length in passes over the training data (steps
  rounded up), else `num_train_steps` does; `opt.warmup_fraction > 0` sets
  the warmup as that fraction of the steps, else `opt.warmup_steps` does.
  """
  if config.num_epochs < 0 or config.opt.warmup_fraction < 0:
    raise UserError(f'num_epochs={config.num_epochs} and opt.warmup_fraction='
                     f'{config.opt.warmup_fraction} must be >= 0')
  total = (math.ceil(config.num_epochs * steps_per_epoch) if config.num_epochs
           else config.num_train_steps)
  if total < 1:
    raise UserError(f'training would run {total} steps: set num_train_steps or '
                     'num_epochs to a positive value')
  warmup = (max(1, round(config.opt.warmup_fraction * total))
            if config.opt.warmup_fraction else config.opt.warmup_steps)
  return total, warmup


def gather_data_states(state: dict[str, int]) -> list[dict[str, int]]:
  """Every process's data position, indexed by process (saved by process 0)."""
  if jax.process_count() == 1:
    return [state]
  pairs = multihost_utils.process_allgather(np.array([state['epoch'], state['cursor']]))
  return [{'epoch': int(e), 'cursor': int(c)} for e, c in np.asarray(pairs)]


@jax.jit
def all_finite(tree: Any) -> jax.Array:
  """Whether every element of every array in `tree` is finite."""
  return jnp.all(jnp.array([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def maybe_initialize_distributed() -> None:
  """Joins a multi-process job when the environment describes one (once).

  JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
  JAX_PROCESS_ID describe the job (jax itself reads only the first; on
  SLURM or a TPU pod it can find all three alone). A process that sends no
  heartbeat for JAX_HEARTBEAT_TIMEOUT_SECONDS (default 100) counts as dead:
  the others then exit with an error instead of waiting for it forever. At
  exit a process waits JAX_SHUTDOWN_TIMEOUT_SECONDS (default 300) for the
  others to exit too.
  """
  env = os.environ
  num_processes = int(env.get('JAX_NUM_PROCESSES') or 0)
  if jax.distributed.is_initialized() or not (
      env.get('JAX_COORDINATOR_ADDRESS') or num_processes > 1):
    return
  jax.distributed.initialize(
      num_processes=num_processes or None,
      process_id=int(env['JAX_PROCESS_ID']) if env.get('JAX_PROCESS_ID') else None,
      heartbeat_timeout_seconds=int(env.get('JAX_HEARTBEAT_TIMEOUT_SECONDS') or 100),
      shutdown_timeout_seconds=int(env.get('JAX_SHUTDOWN_TIMEOUT_SECONDS') or 300))


class _StopSignal:
  """Turns SIGTERM/SIGINT into a flag checked between steps."""

  def __init__(self):
    self.signum = None  # What the loop acts on.
    self._seen = None  # What this process received.
    self._old = {}

  def __enter__(self):
    for s in (signal.SIGTERM, signal.SIGINT):
      self._old[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self._seen = signum
    if jax.process_count() == 1:
      self.signum = signum

  def agree(self) -> None:
    """Makes every process stop if any process was signalled."""
    flags = multihost_utils.process_allgather(np.int32(self._seen or 0))
    self.signum = int(np.max(flags)) or None

  def __exit__(self, *exc):
    for s, handler in self._old.items():
      signal.signal(s, handler)


def evaluate(eval_fn, params, examples: data.Examples, batch_size: int) -> dict:
  """Dev loss, ln(PPL) and token accuracy per target token."""
  sums = {}
  for batch in data.eval_batches(examples, batch_size):
    batch.pop('num_real')  # Filler rows hold no target tokens.
    out = jax.device_get(eval_fn(params, batch))
    for k, v in out.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  tokens = max(sums['tokens'], 1.0)
  return {'eval/loss': sums['loss_sum'] / tokens,
          'eval/ln_ppl': sums['nll_sum'] / tokens,
          'eval/accuracy': sums['correct'] / tokens}


def dev_bleu(config, graphdef, params, tokenizer, sources, references) -> tuple[dict, list[str]]:
  """Greedy BLEU of the dev split (sacreBLEU, cased 13a), and the hypotheses."""
  dc = config.decode
  hyps = inference.translate(
      graphdef, params, tokenizer, sources, batch_size=config.data.eval_batch_size,
      beam_size=1, alpha=dc.alpha, max_len_a=dc.max_len_a, max_len_b=dc.max_len_b,
      max_src_len=config.data.max_eval_len, overlong='truncate')
  return bleu_lib.bleu_scores(hyps, references), hyps


def _last_good(ckpt: ckpt_lib.Checkpointer) -> str:
  step = ckpt.latest_step()
  if step is None:
    return f'No checkpoint was saved yet in {ckpt.directory}.'
  return f'The last good checkpoint (step {step}) is kept in {ckpt.directory}.'


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains per `config`, resuming from the newest intact checkpoint in `workdir`.

  Holds `<workdir>/train.lock` (process 0) while it runs; raises
  `errors.Stopped` after saving a checkpoint when stopped by SIGTERM/SIGINT.
  """
  maybe_initialize_distributed()
  with ckpt_lib.workdir_lock(workdir, enabled=jax.process_index() == 0):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  primary = jax.process_index() == 0
  config_dict = config.to_dict()
  ckpt_lib.check_same_architecture(workdir, config_dict)
  # Bad model settings fail here, before the vocabulary is trained.
  try:
    ModelConfig.from_config(config.model, config.data.vocab_size)
  except ValueError as e:
    raise UserError(f'{e} (fix the --config.model values)') from e
  longest = max(config.data.max_len, config.data.max_eval_len)
  if longest > config.model.max_len:
    raise UserError(f'data.max_len/max_eval_len={longest} exceeds model.max_len='
                     f'{config.model.max_len} (the positional embedding table)')
  training_length(config, 1)  # Bad lengths fail before any work too.
  tokenizer = data.get_tokenizer(config.data, workdir, is_primary=primary)
  cfg = ModelConfig.from_config(config.model, tokenizer.vocab_size)
  train_ex = data.tokenize_split(config.data, config.data.train_split, tokenizer, workdir)
  dev_ex = data.tokenize_split(config.data, config.data.dev_split, tokenizer, workdir)
  batches = data.PackedBatches(train_ex, config.data.batch_size, config.data.max_len,
                               config.seed, jax.process_index(), jax.process_count())
  steps_per_epoch = batches.steps_per_epoch()
  if jax.process_count() > 1:  # Shares pack differently; all must run as many steps.
    steps_per_epoch = int(np.max(multihost_utils.process_allgather(np.int32(steps_per_epoch))))
  total, warmup = training_length(config, steps_per_epoch)
  with config.unlocked():  # config.json records the resolved lengths.
    config.num_train_steps, config.opt.warmup_steps = total, warmup
  config_dict = config.to_dict()
  logging.info('training %d steps (%.2f epochs of %d steps), warmup %d', total,
               total / steps_per_epoch, steps_per_epoch, warmup)
  if primary:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(config_dict, f, indent=2)
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary.analyze(cfg, 1, config.data.max_len, config.data.max_len), f, indent=1)

  mesh = Mesh(np.array(jax.devices()), ('data',))
  batch_sharding = NamedSharding(mesh, P('data'))
  tx = make_optimizer(config.opt, total)
  graphdef, state = create_state(cfg, tx, config.seed, mesh)
  logging.info('model: %s, %d parameters on %d devices', cfg,
               summary.param_groups_total(cfg), jax.device_count())
  ckpt = ckpt_lib.Checkpointer(workdir, config.keep_checkpoints)
  best = ckpt_lib.BestParams(workdir)
  restored = ckpt.restore_intact(state)  # Damaged checkpoints: the one before.
  if restored is not None:
    state, data_states = restored
    if len(data_states) != jax.process_count():  # Each process resumes its own share.
      raise UserError(
          f'the checkpoint at step {int(state.step)} in {workdir} was written by '
          f'{len(data_states)} process(es) and this run has {jax.process_count()}: '
          f'resume with {len(data_states)} (JAX_NUM_PROCESSES), or start a new --workdir')
    batches.set_state(data_states[jax.process_index()])
    logging.info('resumed from step %d', int(state.step))
  step = int(state.step)

  p_train = jax.jit(functools.partial(
      train_step, graphdef=graphdef, tx=tx, label_smoothing=config.opt.label_smoothing),
      donate_argnums=0)
  dropout_rng = jax.random.key(config.seed)
  p_eval = jax.jit(functools.partial(
      eval_step, graphdef=graphdef, label_smoothing=config.opt.label_smoothing))
  schedule = make_schedule(config.opt, total)
  writer = metrics_lib.MetricWriter(workdir, enabled=primary)
  if step == 0:
    writer.write_hparams(config_dict)
  progress = metrics_lib.ReportProgress(total, every_steps=config.log_every)
  dev_text = data.read_split(config.data, config.data.dev_split) if config.bleu_every else None

  batches = data.Prefetch(batches, config.data.prefetch)
  acc, pending, stopped = {}, None, None
  last_log, last_wait = time.time(), 0.0

  def record(step_metrics):  # Host side: NaN guard and accumulation.
    s, m = step_metrics
    m = jax.device_get(m)
    loss = float(m['loss_sum']) / max(float(m['tokens']), 1.0)
    if not (math.isfinite(loss) and math.isfinite(float(m['grad_norm']))):
      raise FloatingPointError(
          f'train loss {loss}, gradient norm {float(m["grad_norm"])} at step {s}; '
          'stopping. ' + _last_good(ckpt))
    for k, v in m.items():
      acc[k] = acc.get(k, 0.0) + float(v)
    acc['steps'] = acc.get('steps', 0) + 1

  try:
    with _StopSignal() as stop:
      while step < total and stop.signum is None:
        batch = jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(batch_sharding, x),
            next(batches))
        state, m = p_train(state, batch, dropout_rng)
        step += 1
        if pending is not None:
          record(pending)
        pending = (step, m)
        boundary = lambda every: every and (step % every == 0 or step == total)
        if jax.process_count() > 1 and boundary(config.log_every):
          stop.agree()  # A signal seen by one process stops them all, together.
        if not (boundary(config.log_every) or boundary(config.eval_every) or
                boundary(config.checkpoint_every) or boundary(config.bleu_every) or
                step == total or stop.signum is not None):
          continue
        record(pending)
        pending = None
        paused_from = time.time()
        if boundary(config.log_every) and acc:
          now, wait = time.time(), batches.wait_seconds
          tokens = acc['tokens']
          scalars = {
              'train/loss': acc['loss_sum'] / tokens,
              'train/nll': acc['nll_sum'] / tokens,
              'train/accuracy': acc['correct'] / tokens,
              'train/grad_norm': acc['grad_norm'] / acc['steps'],
              'train/lr': float(schedule(step - 1)),
              'train/tokens_per_sec': tokens / (now - last_log),
              'train/step_time': (now - last_log) / acc['steps'],
              'train/input_wait_fraction': (wait - last_wait) / (now - last_log)}
          writer.write_scalars(step, scalars)
          progress(step, f"loss {scalars['train/loss']:.3f} | input wait "
                   f"{100 * scalars['train/input_wait_fraction']:.1f}%")
          acc, last_log, last_wait = {}, now, wait
          paused_from = time.time()
        with progress.paused():
          if boundary(config.eval_every):
            scalars = evaluate(p_eval, state.params, dev_ex, config.data.eval_batch_size)
            writer.write_scalars(step, scalars)
            logging.info('step %d: dev ln(PPL) %.4f', step, scalars['eval/ln_ppl'])
            if best.offer(step, scalars['eval/ln_ppl'], state.params):
              logging.info('step %d: best dev ln(PPL) so far; parameters saved '
                           'in %s', step, best.directory)
          if boundary(config.bleu_every):
            scores, hyps = dev_bleu(config, graphdef, state.params, tokenizer, *dev_text)
            writer.write_scalars(step, {'eval/bleu': scores['bleu_13a']})
            writer.write_texts(step, {'eval/samples': '\n\n'.join(
                f'{s}  \n→ {h}  \n(ref: {r})'
                for s, h, r in list(zip(dev_text[0], hyps, dev_text[1]))[:5])})
            logging.info('step %d: dev BLEU %.2f', step, scores['bleu_13a'])
          if (boundary(config.checkpoint_every) or step == total or
              stop.signum is not None):
            if not all_finite(state.params):
              raise FloatingPointError(
                  f'parameters are not finite at step {step}; stopping without '
                  'saving. ' + _last_good(ckpt))
            ckpt.save(step, state, gather_data_states(batches.get_state()), force=True)
          writer.flush()
        last_log += time.time() - paused_from  # Eval and saving are not training time.
      if stop.signum is not None:
        stopped = (f'stopped by signal {stop.signum} at step {step}; checkpoint '
                   'saved, rerun the same command to resume')
        logging.warning(stopped)
  finally:
    batches.close()
    ckpt.close()
    best.close()
    writer.close()
  if stopped:
    raise Stopped(stopped)
  return state
