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
    ({}, '2.35', 'madvise', 'glibc.malloc.hugetlb=1'),
    ({}, '2.36', 'always', None),  # huge pages given unasked: glibc ignores the ask
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


def test_a_start_restarts_once_and_the_new_start_never_again(monkeypatch):
  """On a host that allows it, a start restarts with the tunable and the marker; the new
  start, even where the tunable did not survive (an environment-scrubbing wrapper), does
  not restart again and drops the marker."""
  calls = []
  monkeypatch.setattr(os, 'execve', lambda *args: calls.append(args))
  monkeypatch.setattr(sys, 'platform', 'linux')
  monkeypatch.setattr(runtime, 'glibc_version', lambda: '2.36')
  monkeypatch.setattr(runtime, '_thp_mode', lambda: 'madvise')
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.arena_max=2')
  monkeypatch.delenv(runtime.RESTARTED, raising=False)
  runtime.reexec_with_huge_pages()
  (_, argv, env), = calls
  assert argv[1:] == sys.orig_argv[1:]
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'
  assert env[runtime.RESTARTED] == '1'
  calls.clear()
  monkeypatch.delenv('GLIBC_TUNABLES')
  monkeypatch.setenv(runtime.RESTARTED, '1')
  runtime.reexec_with_huge_pages()
  assert not calls and runtime.RESTARTED not in os.environ


def test_a_program_read_from_standard_input_does_not_restart(monkeypatch):
  """`python - < main.py` or `python < main.py` has consumed its program: a new start
  would read nothing."""
  calls = []
  monkeypatch.setattr(os, 'execve', lambda *args: calls.append(args))
  monkeypatch.setattr(sys, 'platform', 'linux')
  monkeypatch.setattr(runtime, 'glibc_version', lambda: '2.36')
  monkeypatch.setattr(runtime, '_thp_mode', lambda: 'madvise')
  monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
  monkeypatch.delenv(runtime.RESTARTED, raising=False)
  for argv in (['-'], [''], []):
    monkeypatch.setattr(sys, 'argv', argv)
    runtime.reexec_with_huge_pages()
    assert not calls
  monkeypatch.setattr(sys, 'argv', ['main.py'])
  runtime.reexec_with_huge_pages()
  assert len(calls) == 1


def test_tunables_with_sets_the_huge_page_tunable_and_keeps_the_rest():
  environ = {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1:glibc.malloc.arena_max=2'}
  assert runtime.tunables_with(environ, 0) == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0'
  assert runtime.tunables_with({}, 0) == 'glibc.malloc.hugetlb=0'
