"""train_and_evaluate(config, workdir) and evaluate(config, workdir): what main.py calls."""
import json
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

import input_pipeline
import tasks
from models import kernels, padded_vocab_size
from train import checkpointing, config_checks, flops, init_from, loss_scale, optimizer
from train import frozen as frozen_lib
from train import sharding
from train import state as state_lib
from train import steps as steps_lib
from train.metrics import MetricsWriter, Throughput, log_line


class TrainingDiverged(RuntimeError):
  """The training loss became NaN/inf, or rose past train.max_loss."""


def _check_divergence(step: int, loss: float, max_loss: float) -> None:
  if not math.isfinite(loss):
    raise TrainingDiverged(f'The training loss is {loss} at step {step}; lower train.lr, raise '
                           'train.warmup_steps or set train.grad_clip, and use a fresh --workdir.')
  if max_loss and loss > max_loss:
    raise TrainingDiverged(f'The training loss {loss:.4f} at step {step} rose past '
                           f'train.max_loss={max_loss}; lower train.lr or raise the bound.')


def _skipped(step: int, metrics, min_scale: float) -> bool:
  """Whether float16's loss scaling skipped `step`'s update (NaN/inf gradients): the
  state is as it was before the step, so the run goes on at half the scale. A skip
  with the scale already at train.loss_scale_min stops the run: scaling cannot help
  there (float16 overflows unscaled, or the loss itself is NaN/inf), and persistent
  skipping ends there too, after log2(loss_scale_init / loss_scale_min) halvings."""
  if 'skipped' not in metrics or not float(metrics['skipped']):
    return False
  scale = float(metrics['loss_scale'])
  if scale <= min_scale:
    raise TrainingDiverged(
        f"The float16 gradients overflow at step {step} (loss {float(metrics['loss'])}, "
        f"gradient norm {float(metrics['grad_norm'])}) with the loss scale already at "
        f'train.loss_scale_min={min_scale:g}; lower train.lr or set train.grad_clip, or use '
        '--config.dtype=bfloat16 (or float32) in a fresh --workdir.')
  return True


def _check_finite(step: int, metrics, min_scale: float = 1.0) -> None:
  """NaN/inf in the loss or the gradients of `step`: its updated state is garbage,
  unless float16's loss scaling skipped that update (_skipped)."""
  if _skipped(step, metrics, min_scale):
    return
  _check_divergence(step, float(metrics['loss']), 0.0)
  grad_norm = float(metrics['grad_norm'])
  if not math.isfinite(grad_norm):
    raise TrainingDiverged(f'The gradient norm is {grad_norm} at step {step}; lower train.lr, '
                           'raise train.warmup_steps or set train.grad_clip, and use a fresh '
                           '--workdir.')


class _StopRequested:
  """SIGTERM / first Ctrl-C ask the loop to checkpoint and exit after the current step.

  With several processes every host must leave at the same step, so SIGTERM is left
  to JAX's preemption notifier (Ctrl-C is turned into a SIGTERM) and the loop asks the
  coordination service at each step (`should_stop`); a TPU maintenance event arrives
  the same way.
  """

  def __init__(self):
    self.requested = False
    self._previous = {}
    self._multi_process = jax.process_count() > 1

  def __enter__(self):
    if self._multi_process:  # Ctrl-C becomes a SIGTERM for JAX's notifier to spread
      self._previous[signal.SIGINT] = signal.signal(
          signal.SIGINT, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    else:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C stops at once
    logging.warning('Signal %d: saving a checkpoint and exiting after this step.', signum)
    self.requested = True

  def should_stop(self, step: int) -> bool:
    if self._multi_process and multihost_utils.reached_preemption_sync_point(step):
      logging.warning('Preemption notice: every process saves at step %d and exits.', step)
      self.requested = True
    return self.requested

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _check_vocabulary(config, workdir: str, tokenizer: input_pipeline.Tokenizer) -> int:
  """The embedding size, checked against the tokenizer, the config and the saved run."""
  tokenizer_vocab = tokenizer.vocab_size
  if tokenizer_vocab != config.data.tokenizer.vocab_size:
    raise config_checks.ConfigError(
        f"{tokenizer.path} has {tokenizer_vocab} pieces but data.tokenizer.vocab_size="
        f'{config.data.tokenizer.vocab_size}; use a fresh --workdir for a new tokenizer or drop '
        'the override.')
  vocab = config.model.vocab_size or padded_vocab_size(tokenizer_vocab)
  if vocab < tokenizer_vocab:
    raise config_checks.ConfigError(
        f'model.vocab_size={vocab} is smaller than the tokenizer ({tokenizer_vocab} pieces); '
        'set model.vocab_size=0 to size it from the tokenizer.')
  saved_path = os.path.join(workdir, 'config.json')
  if os.path.exists(saved_path) and os.path.isdir(os.path.join(workdir, 'checkpoints')):
    with open(saved_path) as f:
      saved_vocab = json.load(f)['model']['vocab_size']
    if saved_vocab and saved_vocab != vocab:
      raise config_checks.ConfigError(
          f'The checkpoint in {workdir} has an embedding of {saved_vocab} rows but this run '
          f'would build {vocab} (tokenizer of {tokenizer_vocab} pieces); use a fresh --workdir '
          'or the tokenizer and vocabulary the run was started with.')
  return vocab


class Run:
  """Everything a train or eval run builds before its first step, in order: checks,
  mesh, tokenizer and token streams, the model and its task, the task's batches, the
  parameters' shardings and the eval step. Training adds its optimizer and state."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    config_checks.validate(config)
    self.mesh = sharding.make_mesh(config.mesh)
    config_checks.validate_against_mesh(config, dict(self.mesh.shape))
    os.makedirs(workdir, exist_ok=True)
    self.config, self.workdir = config, workdir
    seq_len = config.data.seq_len
    task_class = tasks.task_class(config)
    corpus = input_pipeline.load_corpus(config, workdir, task_class.record_kind)
    task_class.settle_config(config, corpus.splits)
    vocab = _check_vocabulary(config, workdir, corpus.tokenizer)
    dtype = config_checks.compute_dtype(config, jax.default_backend())
    try:
      self.model_cfg = kernels.resolve_attention(tasks.model_config(config, vocab, dtype),
                                                 seq_len)
    except ValueError as e:  # e.g. an attention kernel this machine cannot run
      raise config_checks.ConfigError(str(e)) from None
    self.task = tasks.from_config(config, self.model_cfg)
    # Eval decoding (record tasks) runs the model as --mode=sample does: the attention
    # kernel chosen for the training shapes may not take one-token decode steps.
    self.decode_task = tasks.from_config(
        config, kernels.for_inference(tasks.model_config(config, vocab, dtype)))
    self.data = input_pipeline.build_data(config, corpus,
                                          self.task.examples(corpus.tokenizer, seq_len))
    self.resolved_config = _with_resolved_vocab(config, vocab)
    self.abstract_params, self.param_shardings = state_lib.param_shardings(
        self.task, self.mesh, seq_len)
    # LoRA trains a part of the parameters; the rest (and DPO's reference) stay frozen.
    self.frozen_paths = frozen_lib.frozen_paths(config, self.abstract_params)
    self.trainable = frozen_lib.trainable_part(self.frozen_paths)
    self.frozen_shardings = frozen_lib.shardings_of(self.task, self.param_shardings,
                                                    self.frozen_paths)
    self.bytes_per_token = jnp.asarray(
        np.pad(self.data.tokenizer.bytes_per_token, (0, vocab - self.data.tokenizer.vocab_size)),
        jnp.float32)
    self.eval_step = steps_lib.jit_eval_step(self.task, self.mesh,
                                             self.trainable(self.param_shardings),
                                             self.frozen_shardings)

  def load_frozen(self) -> frozen_lib.Frozen | None:
    """The frozen parameters the steps take beside the trained ones (None: there are none)."""
    return frozen_lib.load(self.config, self.task, self.abstract_params, self.frozen_paths)

  def evaluate(self, params, frozen: frozen_lib.Frozen | None = None) -> dict[str, float]:
    """Loss, bits per byte and accuracy over at most train.eval_steps validation batches.
    params: the trained part (a TrainState's); frozen: the rest (load_frozen)."""
    extra = () if frozen is None else (frozen,)
    totals: dict[str, float] = {}
    for i, local_batch in enumerate(self.data.make_eval_iter()):
      if i >= self.config.train.eval_steps:
        break
      sums = self.eval_step(params, sharding.global_batch(local_batch, self.mesh),
                            self.bytes_per_token, *extra)
      for k, v in jax.device_get(sums).items():
        totals[k] = totals.get(k, 0.0) + float(v)
    results = {k: float(v) for k, v in self.task.eval_results(totals).items()}
    if self.data.eval_records:
      if frozen is not None:
        params = frozen_lib.combine(frozen.params, params)
      results.update(self.decode_task.generation_metrics(params, self.data.tokenizer,
                                                  self.data.eval_records,
                                                  self.config.train.eval_decode_examples))
    return results


def _with_resolved_vocab(config, vocab: int) -> ml_collections.ConfigDict:
  resolved = ml_collections.ConfigDict(config.to_dict())
  resolved.model.vocab_size = vocab
  return resolved


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (resuming from workdir's latest checkpoint) and returns the last logged
  metrics and the step reached."""
  # --- set-up: checks, data, model, optimizer --------------------------------
  source = init_from.prepare(config, workdir)  # the source's model fields and tokenizer
  run = Run(config, workdir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(run.resolved_config.to_json(indent=2))
  train_cfg, seq_len = config.train, config.data.seq_len
  schedule = optimizer.learning_rate_schedule(train_cfg)
  tx = optimizer.make_optimizer(train_cfg)
  scaler = loss_scale.from_config(config, run.model_cfg.dtype)  # None unless float16
  abstract_state, state_shardings = state_lib.state_shardings(
      run.task, tx, run.mesh, seq_len, train_cfg.offload_optimizer, scaler, run.trainable)

  # --- state: restore or create ---------------------------------------------
  manager = checkpointing.make_manager(workdir, train_cfg.keep_checkpoints)
  state, data_state = checkpointing.restore_latest(manager, abstract_state)
  if state is None:
    init_key = jax.random.fold_in(jax.random.key(config.seed), 0)
    state = state_lib.create_train_state(run.task, tx, run.mesh, seq_len, init_key,
                                         train_cfg.offload_optimizer, scaler, run.trainable)
    if source is not None:  # its parameters; new heads (and LoRA's adapters) stay fresh
      state = init_from.start_state(source, state, tx, state_shardings, run.mesh,
                                    run.frozen_paths)
  elif data_state is not None:  # None: an imported checkpoint, which starts the data afresh
    run.data.train_iter.set_state(data_state)
  start_step = int(state.step)
  frozen = run.load_frozen()  # LoRA's base, DPO's reference: read afresh at every start
  extra = () if frozen is None else (frozen,)

  dropout_key = jax.random.fold_in(jax.random.key(config.seed), 1)
  train_step = steps_lib.jit_train_step(run.task, tx, schedule, train_cfg.grad_accum,
                                        dropout_key, run.mesh, state_shardings,
                                        run.frozen_shardings)
  model_params = state.params if frozen is None else frozen_lib.combine(frozen.params,
                                                                         state.params)
  n_params = state_lib.count_params(model_params)
  n_matmul = flops.matmul_param_count(model_params, run.task.output_is_embedding())
  tokens_per_step = config.data.batch_size * seq_len
  flops_per_step = run.task.train_flops_with_frozen(  # LoRA's frozen base
      model_params, config.data.batch_size, seq_len, frozen.params if frozen else None)
  flops_per_token = flops_per_step / tokens_per_step
  peak = flops.peak_flops_per_device(run.model_cfg.dtype) * run.mesh.size
  del model_params
  logging.info('Model: %s parameters (%s in matmuls, %s trained), %.3g FLOPs/token, %s devices '
               '%s, dtype %s; training steps %d..%d on %s tokens.', f'{n_params:,}',
               f'{n_matmul:,}', f'{state_lib.count_params(state.params):,}',
               flops_per_token, run.mesh.size, dict(run.mesh.shape),
               jnp.dtype(run.model_cfg.dtype).name, start_step, train_cfg.steps,
               f'{run.data.train_tokens:,}')

  # --- loop -----------------------------------------------------------------
  writer = MetricsWriter(workdir)
  throughput = Throughput(start_step, train_cfg.steps)
  last: dict[str, float] = {}
  def evaluate_timed():
    start = time.perf_counter()
    results = run.evaluate(state.params, frozen)
    throughput.exclude(time.perf_counter() - start)
    return results

  step, metrics = start_step, None
  try:
    with _StopRequested() as stop:
      while step < train_cfg.steps:
        batch = sharding.global_batch(next(run.data.train_iter), run.mesh)
        previous_metrics = metrics
        state, metrics = train_step(state, batch, *extra)
        # Stay at most one step ahead of the device: bounded memory for queued batches,
        # and a stop request is served within a step, not after a long queue.
        jax.block_until_ready(previous_metrics)
        if previous_metrics is not None:  # already computed: stop at the first NaN/inf step
          _check_finite(step, previous_metrics, train_cfg.loss_scale_min)
        step += 1
        is_last = step == train_cfg.steps
        if step == start_step + 1:
          jax.block_until_ready(metrics)
          throughput.update(step, tokens_per_step)  # starts the clock after compilation
        if step % train_cfg.log_every == 0 or is_last:
          last = {k: float(v) for k, v in jax.device_get(metrics).items() if k != 'skipped'}
          tokens_per_s, eta = throughput.update(step, tokens_per_step)
          last.update(tokens_per_s=tokens_per_s, mfu=tokens_per_s * flops_per_token / peak)
          if step % train_cfg.eval_every == 0 or is_last:
            last.update(evaluate_timed())
          log_line(step, train_cfg.steps, last, eta)
          writer.write(step, last)
          if not _skipped(step, metrics, train_cfg.loss_scale_min):
            _check_divergence(step, last['loss'], train_cfg.max_loss)
        elif step % train_cfg.eval_every == 0:
          evaluated = evaluate_timed()
          log_line(step, train_cfg.steps, evaluated, float('nan'))
          writer.write(step, evaluated)
        stopping = stop.should_stop(step)
        if step % train_cfg.checkpoint_every == 0 or is_last or stopping:
          # Never checkpoint a diverged state: a rerun would resume from it.
          _check_finite(step, metrics, train_cfg.loss_scale_min)
          if not _skipped(step, metrics, train_cfg.loss_scale_min):
            _check_divergence(step, float(metrics['loss']), train_cfg.max_loss)
          checkpointing.save(manager, step, state, run.data.train_iter.get_state())
        if stopping:
          logging.warning('Stopped at step %d; run the same command to resume.', step)
          break
  except TrainingDiverged as e:  # say where a rerun would resume, once the pending save lands
    raise TrainingDiverged(f'{e} No checkpoint of the diverged state was written. '
                           f'{checkpointing.last_good_checkpoint(manager)}') from None
  finally:  # also when the run diverged: pending checkpoints land, files close
    writer.close()
    checkpointing.finish(manager)  # CheckpointSaveError when a background save failed
  return {**last, 'step': step}


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Evaluates the latest checkpoint in workdir (its parameters only)."""
  run = Run(config, workdir)
  manager = checkpointing.make_manager(workdir, config.train.keep_checkpoints)
  params, step = checkpointing.restore_params(manager, run.trainable(run.abstract_params))
  manager.close()
  if params is None:
    raise FileNotFoundError(f'No checkpoint in {workdir}/checkpoints; train first with '
                            f'python main.py --config=CFG --workdir={workdir}.')
  return {'step': step, **run.evaluate(params, run.load_frozen())}
