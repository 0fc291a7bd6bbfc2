"""The device mesh and the one table that maps logical axis names to mesh axes.

Models name their axes ('embed', 'heads', ...); only this module knows the mesh
axes ('data', 'fsdp', 'tensor'). Batches are split over data x fsdp; parameters
over fsdp (ZeRO-3 style) and tensor (Megatron-style heads and MLP columns).
"""
import contextlib
import math
import warnings

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

LOGICAL_AXIS_RULES = (
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('embed', 'fsdp'),
    ('vocab', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('kv', None),
    ('mlp', 'tensor'),
    ('layers', None),
    ('max_len', None),
    ('relpos_buckets', None),
    ('token_types', None),
    ('lora_rank', None),
)


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Resolves the one -1 entry of (data, fsdp, tensor) to 'all remaining devices'."""
  sizes = [mesh_config[name] for name in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'At most one of mesh.data/fsdp/tensor may be -1; got {sizes}.')
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
    raise ValueError(f'mesh (data, fsdp, tensor) = {tuple(sizes)} does not fit {num_devices} '
                     'devices; make their product the device count (or use -1 for one axis).')
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ValueError(f'mesh (data, fsdp, tensor) = {tuple(sizes)} uses {math.prod(sizes)} '
                     f'devices but {num_devices} are present; set one axis to -1.')
  return tuple(sizes)


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """The (data, fsdp, tensor) mesh. With mesh.num_slices > 1 (several TPU slices, or
  several GPU hosts) the data axis spans the slower data-centre network between them
  and fsdp / tensor stay within each fast interconnect (ICI, NVLink)."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  slices = mesh_config.get('num_slices', 1)
  if slices > 1:
    if shape[0] % slices:
      raise ValueError(f'mesh.data={shape[0]} must be a multiple of mesh.num_slices={slices}: '
                       'data parallelism is what crosses between slices.')
    on_tpu = devices[0].platform == 'tpu'  # slices: TPU slices, else hosts (processes)
    granules = len({d.slice_index for d in devices}) if on_tpu else jax.process_count()
    if slices != granules:
      raise ValueError(f'mesh.num_slices={slices}, but these devices form {granules} slice(s) '
                       f"({'TPU slices' if on_tpu else 'one per process'}); "
                       'set mesh.num_slices to that.')
    per_slice = (shape[0] // slices, shape[1], shape[2])
    device_array = mesh_utils.create_hybrid_device_mesh(
        per_slice, (slices, 1, 1), devices=devices, process_is_granule=not on_tpu)
    logging.info('Hybrid mesh over %d slices; the processes of each data index: %s', slices,
                 [sorted({d.process_index for d in row.flat}) for row in device_array])
  else:
    device_array = mesh_utils.create_device_mesh(shape,
                                                 devices=np.asarray(devices).ravel().tolist())
  return Mesh(device_array, MESH_AXES)


@contextlib.contextmanager
def mesh_context(mesh: Mesh):
  """Traces under `mesh` and the logical-axis rules, so that Flax's activation
  constraints apply: recent Flax reads the abstract mesh (set inside a trace by
  `use_abstract_mesh`), older Flax and JAX the legacy `with mesh:`; both are entered."""
  with contextlib.ExitStack() as stack:
    with warnings.catch_warnings():  # `with mesh:` is deprecated since JAX 0.8
      warnings.simplefilter('ignore', DeprecationWarning)
      stack.enter_context(mesh)
    if hasattr(jax.sharding, 'use_abstract_mesh'):
      stack.enter_context(jax.sharding.use_abstract_mesh(mesh.abstract_mesh))
    stack.enter_context(nn.logical_axis_rules(LOGICAL_AXIS_RULES))
    yield


def logical_to_sharding(boxed_tree, mesh: Mesh):
  """NamedShardings for a tree of logically partitioned (boxed) values."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sequences split over every data-parallel device; sequence positions kept whole."""
  return NamedSharding(mesh, P(('data', 'fsdp')))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Builds global arrays from this process's rows of the batch."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
