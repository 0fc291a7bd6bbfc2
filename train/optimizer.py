"""AdamW with linear warmup, cosine decay and global-norm clipping."""
import jax
import ml_collections
import optax


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  """0 -> lr over warmup_steps, then cosine to lr * min_lr_ratio at train.steps."""
  warmup = min(train.warmup_steps, train.steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train.lr, warmup_steps=warmup,
      decay_steps=max(train.steps, warmup + 1), end_value=train.lr * train.min_lr_ratio)


def decay_mask(params):
  """Weight decay on matrices (kernels, embeddings) only, never on norms' scales or biases.

  Scanned layers add a leading 'layers' axis, so the rule is on the parameter's
  name rather than its rank.
  """
  def is_decayed(path, _):
    name = getattr(path[-1], 'key', str(path[-1]))
    return name not in ('scale', 'bias')
  return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  adamw = optax.adamw(learning_rate_schedule(train), b1=train.b1, b2=train.b2,
                      weight_decay=train.weight_decay, mask=decay_mask)
  if train.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(train.grad_clip), adamw)
  return adamw
