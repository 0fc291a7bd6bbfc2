"""Dynamic loss scaling, which float16 training needs (bfloat16 and float32 do not).

float16 keeps 10 mantissa bits and 5 exponent bits: values below ~6e-8 flush to zero
and above 65504 overflow. Backward-pass values of a mean loss are small, so many
underflow. The step multiplies the loss by `scale` before differentiating (gradients
grow by the same factor through every float16 op) and divides the float32 gradients
by it afterwards. A step whose gradients are NaN/inf skips its update and halves
the scale; `growth_interval` finite steps in a row double it again. So the scale
hovers just below where the largest gradients overflow.

The scale multiplies the loss *per token position* of the step (the train step
divides by the positions before scaling), so the usual defaults (2**15, 2000 steps)
hold whatever the batch size.
"""
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections


@flax.struct.dataclass
class LossScale:
  """The scale and its counters: part of the train state, checkpointed and restored.

  Only the arrays are state; how the scale moves (growth_interval, factor, min_scale)
  comes from the config of each run.
  """
  scale: jax.Array  # float32 []: what the loss is multiplied by
  good_steps: jax.Array  # int32 []: finite steps since the scale last changed
  skipped_steps: jax.Array  # int32 []: updates skipped so far (their gradients overflowed)
  growth_interval: int = flax.struct.field(pytree_node=False, default=2000)
  factor: float = flax.struct.field(pytree_node=False, default=2.0)
  min_scale: float = flax.struct.field(pytree_node=False, default=1.0)

  @classmethod
  def create(cls, init: float, growth_interval: int = 2000, factor: float = 2.0,
             min_scale: float = 1.0) -> 'LossScale':
    return cls(scale=jnp.asarray(init, jnp.float32), good_steps=jnp.zeros((), jnp.int32),
               skipped_steps=jnp.zeros((), jnp.int32), growth_interval=growth_interval,
               factor=factor, min_scale=min_scale)

  def update(self, finite: jax.Array) -> 'LossScale':
    """After a step: halve (not below min_scale) and count a skip when the gradients
    were not finite; double after growth_interval finite steps in a row."""
    good = jnp.where(finite, self.good_steps + 1, 0)
    grow = good >= self.growth_interval
    scale = jnp.where(finite, jnp.where(grow, self.scale * self.factor, self.scale),
                      jnp.maximum(self.scale / self.factor, self.min_scale))
    return self.replace(scale=scale.astype(jnp.float32),
                        good_steps=jnp.where(grow, 0, good).astype(jnp.int32),
                        skipped_steps=self.skipped_steps + (~finite).astype(jnp.int32))


def all_finite(tree) -> jax.Array:
  """True when no leaf of `tree` holds a NaN or inf."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def select(keep_new: jax.Array, new, old):
  """`new` where keep_new, else `old`, leaf by leaf (bit-exact either way)."""
  return jax.tree.map(lambda n, o: jnp.where(keep_new, n, o), new, old)


def from_config(config: ml_collections.ConfigDict, dtype) -> LossScale | None:
  """A fresh scaler for a float16 run (compute `dtype`); None for every other dtype,
  whose train state stays as it was before scaling existed."""
  if jnp.dtype(dtype) != jnp.float16:
    return None
  t = config.train
  return LossScale.create(t.loss_scale_init, t.loss_scale_growth_interval,
                          t.loss_scale_factor, t.loss_scale_min)
