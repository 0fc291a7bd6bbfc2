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
         "print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])")


@pytest.mark.skipif(runtime._thp_mode() == 'never' or not sys.platform.startswith('linux'),
                    reason='the kernel gives no transparent huge pages here')
def test_a_command_restarts_once_with_its_arguments_and_tunables():
  env = {**os.environ, 'GLIBC_TUNABLES': 'glibc.malloc.arena_max=4'}
  out = subprocess.run([sys.executable, '-c', PROBE, '--flag=1', 'two words'], cwd=ROOT,
                       env=env, capture_output=True, text=True, check=True, timeout=60)
  if runtime.huge_page_tunables(env, os.confstr('CS_GNU_LIBC_VERSION').split()[1],
                                runtime._thp_mode()) is None:
    pytest.skip('glibc here has no huge page tunable')
  assert out.stdout.split('\n')[0] == (
      "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1 ['--flag=1', 'two words']")
  opted_out = {**os.environ, 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}
  out = subprocess.run([sys.executable, '-c', PROBE], cwd=ROOT, env=opted_out,
                       capture_output=True, text=True, check=True, timeout=60)
  assert out.stdout.startswith('glibc.malloc.hugetlb=0 ')
