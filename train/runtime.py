"""Process-level set-up before any work: huge pages for the host's allocations, JAX's
multi-host runtime, the persistent compilation cache, and a console kept to this
project's progress lines."""
import logging as std_logging
import os
import sys

from absl import logging

HUGE_PAGE_TUNABLE = 'glibc.malloc.hugetlb'
RESTARTED = 'LLM_RESTARTED_FOR_HUGE_PAGES'  # set for the new start: it never restarts again
_THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'


def huge_page_tunables(environ, glibc_version: str, thp_mode: str) -> str | None:
  """The GLIBC_TUNABLES that make glibc's malloc ask for transparent huge pages, or None
  where it already says (either way: `glibc.malloc.hugetlb=0` opts out), where glibc is
  older than 2.35 (no such tunable) or the kernel does not give huge pages on request
  (thp_mode 'madvise'; under 'always' it gives them unasked and glibc ignores the ask)."""
  if HUGE_PAGE_TUNABLE in environ.get('GLIBC_TUNABLES', '') or thp_mode != 'madvise':
    return None
  try:
    major, minor = (int(n) for n in glibc_version.split('.')[:2])
  except ValueError:
    return None
  if (major, minor) < (2, 35):
    return None
  return tunables_with(environ, 1)


def tunables_with(environ, hugetlb: int) -> str:
  """environ's GLIBC_TUNABLES with glibc.malloc.hugetlb set to `hugetlb`, the rest kept."""
  kept = [t for t in environ.get('GLIBC_TUNABLES', '').split(':')
          if t and not t.startswith(f'{HUGE_PAGE_TUNABLE}=')]
  return ':'.join(kept + [f'{HUGE_PAGE_TUNABLE}={hugetlb}'])


def glibc_version() -> str:
  """This process's glibc version ('2.36'), or 'none' under another C library."""
  try:
    libc, version = os.confstr('CS_GNU_LIBC_VERSION').split()
  except (ValueError, OSError, AttributeError):
    return 'none'
  return version if libc == 'glibc' else 'none'


def _thp_mode() -> str:
  """The kernel's transparent huge page mode: 'always', 'madvise' or 'never'."""
  try:
    with open(_THP_MODE_FILE) as f:
      return f.read().split('[', 1)[1].split(']', 1)[0]
  except (OSError, IndexError):
    return 'never'


def reexec_with_huge_pages() -> None:
  """Starts this command again, at once, with glibc's malloc asking for transparent huge
  pages (where glibc and the kernel allow it and GLIBC_TUNABLES does not already say).

  XLA:CPU allocates a step's temporaries afresh on every call, and faulting them in 4 KB
  at a time costs a large share of a training step in kernel time; 2 MB pages take 512
  times fewer faults (benchmarks/RESULTS.md has the measurements, on XLA:CPU only).
  glibc reads its tunables only when a process starts, hence the new start: call this
  as early as possible (main.py calls it before JAX loads; a benchmark, which has
  imported JAX by then, pays that import twice)."""
  if os.environ.pop(RESTARTED, None) is not None:  # this is the new start (its children
    return  # inherit the tunable, not the marker)
  # A program read from standard input (`python - < main.py`, `python < main.py`: argv
  # ['-'] or ['']) cannot be read again; nor can an embedded interpreter's (argv []).
  if (not sys.platform.startswith('linux') or not sys.executable
      or sys.argv[:1] in ([], ['-'], [''])):
    return
  tunables = huge_page_tunables(os.environ, glibc_version(), _thp_mode())
  if tunables is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:],
              {**os.environ, 'GLIBC_TUNABLES': tunables, RESTARTED: '1'})
  except OSError:  # not restartable here: carry on with the pages it has
    pass


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
