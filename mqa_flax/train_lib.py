"""The training loop: data, state, a jitted data-parallel step, eval, checkpoints.

Parameters are float32 and replicated on every device; batches are sharded
over the one mesh axis `data` (with several processes, each feeds its own
rows). Sub-layers compute in `config.model.dtype`. The loop dispatches step
i before fetching step i-1's metrics, so the host never waits for the device
except at logging, evaluation and checkpoint boundaries.

`train_and_evaluate` runs a `Trainer`: `prepare` (checks, vocabulary, data,
state, resume), then `run`, whose loop calls `at_boundary` at every step that
logs, evaluates, scores BLEU or saves.
"""

import dataclasses
import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mqa_flax import attention
from mqa_flax import bleu as bleu_lib
from mqa_flax import checkpoint as ckpt_lib
from mqa_flax import costs
from mqa_flax import data
from mqa_flax import files
from mqa_flax import hosts
from mqa_flax import inference
from mqa_flax import metrics as metrics_lib
from mqa_flax import state as state_lib
from mqa_flax import steps
from mqa_flax.config import ModelConfig, check_ranges
from mqa_flax.errors import Stopped, UserError
from mqa_flax.model import abstract_model

# Attention over whole sequences other than XLA's einsums must give, on the
# first batch, gradients within this relative difference of the einsums'
# (median over the parameter arrays; see Trainer.check_seq_attention).
SEQ_ATTENTION_GRADIENT_GAP = 0.2


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


@jax.jit
def all_finite(tree: Any) -> jax.Array:
  """Whether every element of every array in `tree` is finite."""
  return jnp.all(jnp.array([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


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


def dev_bleu(config: ml_collections.ConfigDict, graphdef, params, tokenizer,
             sources: list[str], references: list[str]) -> tuple[dict, list[str]]:
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


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> state_lib.TrainState:
  """Trains per `config`, resuming from the newest intact checkpoint in `workdir`.

  Holds `<workdir>/train.lock` (process 0) while it runs; raises
  `errors.Stopped` after saving a checkpoint when stopped by SIGTERM/SIGINT.
  """
  hosts.maybe_initialize_distributed()
  with ckpt_lib.workdir_lock(workdir, enabled=jax.process_index() == 0):
    trainer = Trainer(config, workdir)
    trainer.prepare()
    return trainer.run()


def is_due(step: int, every: int, total: int) -> bool:
  """Whether something done every `every` steps (0: never) happens at `step`;
  it always happens at the last step."""
  return bool(every) and (step % every == 0 or step == total)


class Trainer:
  """One training run in `workdir`: its data, state, outputs and loop."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = workdir
    self.primary = jax.process_index() == 0

  def check_config(self) -> None:
    """Refuses bad settings before any work (the vocabulary takes minutes)."""
    c = self.config
    check_ranges(c)
    ckpt_lib.check_same_architecture(self.workdir, c.to_dict())
    ModelConfig.from_config(c.model, c.data.vocab_size,
                            seq_attention_impl=c.seq_attention_impl)
    if c.seq_attention_impl == 'cudnn' and not attention.for_gpu():
      raise UserError(f"seq_attention_impl='cudnn' needs a CUDA GPU; this backend is "
                      f"{jax.default_backend()!r}: use --config.seq_attention_impl=xla")
    longest = max(c.data.max_len, c.data.max_eval_len)
    if longest > c.model.max_len:
      raise UserError(f'data.max_len/max_eval_len={longest} exceeds model.max_len='
                      f'{c.model.max_len} (the positional embedding table)')
    training_length(c, 1)

  def load_data(self) -> None:
    """The vocabulary, tokenized splits, packed batches and the training length."""
    c = self.config
    self.tokenizer = data.get_tokenizer(c.data, self.workdir, is_primary=self.primary)
    self.cfg = ModelConfig.from_config(c.model, self.tokenizer.vocab_size,
                                       seq_attention_impl=c.seq_attention_impl)
    self.record = ckpt_lib.run_record(c.model.to_dict(), self.tokenizer.fingerprint,
                                      self.tokenizer.vocab_size)
    self.ckpt = ckpt_lib.Checkpointer(self.workdir, c.keep_checkpoints, self.record)
    for step in sorted(self.ckpt.manager.all_steps(), reverse=True):  # Before any work.
      try:
        self.ckpt.check_record(step)
      except ckpt_lib.CheckpointDamaged:
        pass  # Set aside when restoring.
    self.train_examples = data.tokenize_split(c.data, c.data.train_split,
                                              self.tokenizer, self.workdir)
    self.dev = data.tokenize_split(c.data, c.data.dev_split, self.tokenizer, self.workdir)
    self.dev_text = data.read_split(c.data, c.data.dev_split) if c.bleu_every else None
    self.batches = self.first_batches()
    per_epoch = self.batches.steps_per_epoch()
    if jax.process_count() > 1:  # Shares pack differently; all must run as many steps.
      per_epoch = int(np.max(multihost_utils.process_allgather(np.int32(per_epoch))))
    self.total, warmup = training_length(c, per_epoch)
    with c.unlocked():  # config.json records the resolved lengths.
      c.num_train_steps, c.opt.warmup_steps = self.total, warmup
    logging.info('training %d steps (%.2f epochs of %d steps), warmup %d',
                 self.total, self.total / per_epoch, per_epoch, warmup)

  def first_batches(self) -> data.PackedBatches:
    """This process's share of the training batches, from the first."""
    c = self.config
    return data.PackedBatches(self.train_examples, c.data.batch_size, c.data.max_len, c.seed,
                              jax.process_index(), jax.process_count())

  def write_run_files(self) -> None:
    """config.json (the resolved config) and summary.json (sizes and costs)."""
    if not self.primary:
      return
    c = self.config
    files.write_json(os.path.join(self.workdir, 'config.json'), c.to_dict(), 2)
    files.write_json(os.path.join(self.workdir, 'summary.json'),
                     costs.analyze(self.cfg, 1, c.data.max_len, c.data.max_len))

  def build_state(self) -> None:
    """A fresh train state, then the newest intact checkpoint over it."""
    c = self.config
    self.mesh = Mesh(np.array(jax.devices()), ('data',))
    self.tx = state_lib.make_optimizer(c.opt, self.total)
    self.graphdef, self.state = state_lib.create_state(self.cfg, self.tx, c.seed,
                                                       self.mesh)
    logging.info('model: %s, %d parameters on %d devices', self.cfg,
                 costs.param_count(self.cfg), jax.device_count())
    self.best = ckpt_lib.BestParams(self.workdir, self.record)
    restored = self.ckpt.restore_intact(self.state)  # Damaged: the one before.
    if restored is not None:
      self.state, data_states = restored
      if len(data_states) != jax.process_count():  # Each process resumes its share.
        raise UserError(
            f'the checkpoint at step {int(self.state.step)} in {self.workdir} was '
            f'written by {len(data_states)} process(es) and this run has '
            f'{jax.process_count()}: resume with {len(data_states)} '
            '(JAX_NUM_PROCESSES), or start a new --workdir')
      self.batches.set_state(data_states[jax.process_index()])
      logging.info('resumed from step %d', int(self.state.step))

  def compile_steps(self) -> None:
    """The jitted train and eval steps (compiled at their first call)."""
    smoothing = self.config.opt.label_smoothing
    self.train_step = jax.jit(functools.partial(
        steps.train_step, graphdef=self.graphdef, tx=self.tx,
        label_smoothing=smoothing), donate_argnums=0)
    self.eval_step = jax.jit(functools.partial(
        steps.eval_step, graphdef=self.graphdef, label_smoothing=smoothing))

  def prepare(self) -> None:
    """Everything before the first step."""
    self.check_config()
    self.load_data()
    self.build_state()
    self.write_run_files()  # Once the checkpoints are known to match.
    self.compile_steps()
    self.seq_check = self.check_seq_attention()

  def check_seq_attention(self) -> dict | None:
    """With attention over whole sequences other than XLA's einsums: the loss
    and gradients of the first training batch (no dropout), computed both
    ways from the parameters the run started from (a trained model's smaller
    gradients would blur the comparison). Refuses to train where the
    gradients differ by more than `SEQ_ATTENTION_GRADIENT_GAP` (median over
    the parameter arrays); returns what it measured (launches.jsonl keeps it)."""
    impl = self.cfg.seq_attention_impl
    if impl == 'xla':
      return None
    reference = abstract_model(dataclasses.replace(self.cfg, seq_attention_impl='xla'))[0]

    def gap(seed, batch):
      return steps.gradient_gap(
          state_lib.init_params(self.cfg, seed), batch, graphdef=self.graphdef,
          reference=reference, label_smoothing=self.config.opt.label_smoothing)

    batch = self.global_batch(next(self.first_batches()))
    out = jax.device_get(jax.jit(gap)(jnp.asarray(self.config.seed, jnp.int32), batch))
    relative = {jax.tree_util.keystr(k): float(v)
                for k, v in jax.tree_util.tree_leaves_with_path(out['relative'])}
    worst = max(relative, key=relative.get)
    check = dict(impl=impl, loss=float(out['loss']), xla_loss=float(out['reference_loss']),
                 median_gradient_gap=float(np.median(list(relative.values()))),
                 largest_gradient_gap=relative[worst], largest_at=worst)
    logging.info('seq_attention_impl=%s against xla on the first batch: %s', impl, check)
    if not check['median_gradient_gap'] <= SEQ_ATTENTION_GRADIENT_GAP:  # NaN fails too.
      raise UserError(
          f"seq_attention_impl={impl!r} and 'xla' disagree on the first batch: the "
          f"median gradient differs by {check['median_gradient_gap']:.3g} (limit "
          f'{SEQ_ATTENTION_GRADIENT_GAP}; largest {relative[worst]:.3g} at {worst}), '
          f"loss {check['loss']:.5g} against {check['xla_loss']:.5g}: train with "
          '--config.seq_attention_impl=xla')
    return check

  def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """A batch of this process's rows as one array sharded over the mesh."""
    sharding = NamedSharding(self.mesh, P('data'))
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, x), local)

  def run(self) -> state_lib.TrainState:
    """Trains to the last step or a signal; returns the final state."""
    c = self.config
    step = int(self.state.step)
    self.writer = metrics_lib.MetricWriter(self.workdir, enabled=self.primary)
    if self.primary:  # One line per start or resume: what trained these steps.
      metrics_lib.jsonl_appender(os.path.join(self.workdir, metrics_lib.LAUNCHES_FILE))(dict(
          metrics_lib.provenance(), start_step=step, devices=jax.device_count(),
          processes=jax.process_count(), seq_attention_check=self.seq_check))
    if step == 0:
      self.writer.write_hparams(c.to_dict())
    self.schedule = state_lib.make_schedule(c.opt, self.total)
    self.progress = metrics_lib.ReportProgress(self.total)
    self.batches = data.Prefetch(self.batches, c.data.prefetch)
    self.sums, self.last_wait = {}, 0.0
    dropout_rng = jax.random.key(c.seed)
    pending = None  # The last step's metrics, fetched after the next dispatch.
    try:
      with hosts.StopSignal() as stop:
        self.progress.start(step)
        while step < self.total and stop.signum is None:
          batch = self.global_batch(next(self.batches))
          self.state, m = self.train_step(self.state, batch, dropout_rng)
          step += 1
          if pending is not None:
            self.add_metrics(*pending)
          pending = (step, m)
          if jax.process_count() == 1 or is_due(step, c.log_every, self.total):
            stop.agree()  # A signal seen by one process stops them all, together.
          if self.is_boundary(step) or stop.signum is not None:
            self.add_metrics(*pending)
            pending = None
            self.at_boundary(step, stopping=stop.signum is not None)
      if stop.signum is not None:
        message = (f'stopped by signal {stop.signum} at step {step}; checkpoint '
                   'saved, rerun the same command to resume')
        logging.warning(message)
        raise Stopped(message)
    finally:
      self.batches.close()
      self.ckpt.close()
      self.best.close()
      self.writer.close()
    return self.state

  def is_boundary(self, step: int) -> bool:
    """Whether `step` logs, evaluates, scores BLEU or saves."""
    c = self.config
    return step == self.total or any(
        is_due(step, every, self.total)
        for every in (c.log_every, c.eval_every, c.bleu_every, c.checkpoint_every))

  def at_boundary(self, step: int, stopping: bool) -> None:
    """Logs, evaluates, scores and saves, as due at `step`."""
    c = self.config
    if is_due(step, c.log_every, self.total) and self.sums:
      self.log_train(step)
    with self.progress.paused():
      if is_due(step, c.eval_every, self.total):
        self.evaluate_dev(step)
      if is_due(step, c.bleu_every, self.total):
        self.score_dev_bleu(step)
      if is_due(step, c.checkpoint_every, self.total) or step == self.total or stopping:
        self.save(step)  # The last step is always saved.
      self.writer.flush()

  def add_metrics(self, step: int, m: dict) -> None:
    """Adds one step's sums to the log interval's; stops on a non-finite loss."""
    m = jax.device_get(m)
    loss = float(m['loss_sum']) / max(float(m['tokens']), 1.0)
    if not (math.isfinite(loss) and math.isfinite(float(m['grad_norm']))):
      raise FloatingPointError(
          f'train loss {loss}, gradient norm {float(m["grad_norm"])} at step {step}; '
          'stopping. ' + _last_good(self.ckpt))
    for k, v in m.items():
      self.sums[k] = self.sums.get(k, 0.0) + float(v)
    self.sums['steps'] = self.sums.get('steps', 0) + 1

  def log_train(self, step: int) -> None:
    """Train scalars over the interval since the last log, and the progress line."""
    acc, wait = self.sums, self.batches.wait_seconds
    tokens = acc['tokens']
    loss = acc['loss_sum'] / tokens
    waited = (wait - self.last_wait) / self.progress.elapsed()
    seconds = self.progress(step, f'loss {loss:.3f} | input wait {100 * waited:.1f}%')
    self.writer.write_scalars(step, {
        'train/loss': loss,
        'train/nll': acc['nll_sum'] / tokens,
        'train/accuracy': acc['correct'] / tokens,
        'train/grad_norm': acc['grad_norm'] / acc['steps'],
        'train/lr': float(self.schedule(step - 1)),
        'train/tokens_per_sec': tokens / seconds,
        'train/step_time': seconds / acc['steps'],
        'train/input_wait_fraction': waited})
    self.sums, self.last_wait = {}, wait

  def evaluate_dev(self, step: int) -> None:
    """Dev loss and ln(PPL); the best parameters so far go to `<workdir>/best`."""
    scalars = evaluate(self.eval_step, self.state.params, self.dev,
                       self.config.data.eval_batch_size)
    self.writer.write_scalars(step, scalars)
    logging.info('step %d: dev ln(PPL) %.4f', step, scalars['eval/ln_ppl'])
    if self.best.offer(step, scalars['eval/ln_ppl'], self.state.params):
      logging.info('step %d: best dev ln(PPL) so far; parameters saved in %s',
                   step, self.best.directory)

  def score_dev_bleu(self, step: int) -> None:
    """Greedy dev BLEU and five sample translations."""
    sources, references = self.dev_text
    scores, hyps = dev_bleu(self.config, self.graphdef, self.state.params,
                            self.tokenizer, sources, references)
    self.writer.write_scalars(step, {'eval/bleu': scores['bleu_13a']})
    self.writer.write_texts(step, {'eval/samples': '\n\n'.join(
        f'{s}  \n→ {h}  \n(ref: {r})'
        for s, h, r in list(zip(sources, hyps, references))[:5])})
    logging.info('step %d: dev BLEU %.2f', step, scores['bleu_13a'])

  def save(self, step: int) -> None:
    """A train checkpoint of finite parameters, with every process's data position."""
    if not all_finite(self.state.params):
      raise FloatingPointError(f'parameters are not finite at step {step}; stopping '
                               'without saving. ' + _last_good(self.ckpt))
    self.ckpt.save(step, self.state, hosts.gather_data_states(self.batches.get_state()),
                   force=True)
