"""Process set-up: a command restarts itself once with glibc's malloc asking for huge
pages, keeps its arguments and the user's own tunables, and never loops."""
import os
import subprocess
import sys

import pytest

from train import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('environ, version, thp, expected', [
    ({}, '2.36', 'madvise', 'glibc.malloc.hugetlb=1'),
    ({}, '2.35', 'always', 'glibc.malloc.hugetlb=1'),
    ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, '2.36', 'madvise',
     'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'),  # the user's tunables kept
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, '2.36', 'madvise', None),  # opted out
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}, '2.36', 'madvise', None),  # restarted
    ({}, '2.34', 'madvise', None),  # no such tunable yet
    ({}, '2.36', 'never', None),  # the kernel gives no huge pages
    ({}, 'unknown', 'madvise', None),
])
def test_huge_page_tunables(environ, version, thp, expected):
  assert runtime.huge_page_tunables(environ, version, thp) == expected


PROBE = ('from train import runtime; runtime.reexec_with_huge_pages(); import os, sys; '
         "print(os.environ.get('GLIBC_TUNABLES'), os.environ.get(runtime.RESTARTED), "
         'sys.argv[1:])')


@pytest.mark.skipif(runtime.huge_page_tunables({}, runtime.glibc_version(), runtime._thp_mode())
                    is None
                    or not sys.platform.startswith('linux'),
                    reason='no glibc huge page tunable or no transparent huge pages here')
def test_a_command_restarts_once_with_its_arguments_and_tunables():
  env = {name: value for name, value in os.environ.items() if name != runtime.RESTARTED}
  env['GLIBC_TUNABLES'] = 'glibc.malloc.arena_max=4'
  out = subprocess.run([sys.executable, '-c', PROBE, '--flag=1', 'two words'], cwd=ROOT,
                       env=env, capture_output=True, text=True, check=True, timeout=60)
  # Restarted once, with the marker consumed (children of the command inherit the tunable).
  assert out.stdout.split('\n')[0] == (
      "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1 None ['--flag=1', 'two words']")
  opted_out = {**env, 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}
  out = subprocess.run([sys.executable, '-c', PROBE], cwd=ROOT, env=opted_out,
                       capture_output=True, text=True, check=True, timeout=60)
  assert out.stdout.startswith('glibc.malloc.hugetlb=0 ')


def test_the_new_start_never_restarts_again(monkeypatch):
  """Even where the tunable did not survive (an environment-scrubbing wrapper), the marker
  stops a second restart, and is gone afterwards."""
  calls = []
  monkeypatch.setattr(os, 'execve', lambda *args: calls.append(args))
  monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
  monkeypatch.setenv(runtime.RESTARTED, '1')
  runtime.reexec_with_huge_pages()
  assert not calls and runtime.RESTARTED not in os.environ
