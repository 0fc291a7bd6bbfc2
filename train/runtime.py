"""Process-level set-up before any work: JAX's multi-host runtime, the persistent
compilation cache, and a console kept to this project's progress lines."""
import logging as std_logging
import os

from absl import logging


def quiet_library_info_logs() -> None:
  """Libraries' INFO chatter (Orbax logs dozens of lines per checkpoint) is dropped;
  their warnings stay."""
  def keep(record):
    return record.levelno >= std_logging.WARNING or not any(
        name in record.pathname for name in ('orbax', 'jax/_src', 'grain', 'absl/'))
  logging.get_absl_handler().addFilter(keep)


def _multi_host_environment() -> bool:
  """A TPU VM pod slice (several workers) or a SLURM job of several tasks, where
  jax.distributed.initialize() finds the coordinator and process ids by itself."""
  tpu_workers = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return (',' in tpu_workers or 'MEGASCALE_COORDINATOR_ADDRESS' in os.environ
          or int(os.environ.get('SLURM_STEP_NUM_TASKS', '1')) > 1)  # inside `srun`, not sbatch


def initialize_distributed(coordinator: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
  """JAX's multi-controller runtime: one process per host, all running this command.
  A no-op for a single process outside a pod or SLURM job."""
  explicit = coordinator or num_processes
  if not explicit and not _multi_host_environment():
    return
  import jax
  try:  # CPU processes (tests, simulated hosts) exchange collectives through gloo
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  except AttributeError:  # a JAX without the option (gloo is then its default)
    pass
  if explicit:
    jax.distributed.initialize(coordinator, num_processes, process_id)
  else:
    jax.distributed.initialize()
  logging.info('Process %d of %d; %d local and %d global devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def use_compilation_cache(workdir: str) -> None:
  """Compiled programs persist beside the workdir, so a resumed run or the next run of
  a sweep skips compilation."""
  import jax
  parent = (os.path.expanduser('~/.cache') if '://' in workdir  # a bucket: cache locally
            else os.path.dirname(os.path.abspath(workdir.rstrip('/'))))
  jax.config.update('jax_compilation_cache_dir', os.path.join(parent, 'jax_cache'))
