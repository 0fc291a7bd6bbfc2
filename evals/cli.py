"""`python main.py --mode=eval --workdir=DIR --tasks=a,b [--num_shots=K] [--limit=N] [--json]`:
its flags. Without --tasks, --mode=eval reports validation loss and bits per byte."""
from absl import flags

_TASKS = flags.DEFINE_list('tasks', [], 'eval: evaluation tasks, comma-separated: built-in '
                           'names (bible_cloze, bible_book, bible_genre, bible_en_ja), '
                           'validation_split (the run\'s validation tokens, one rolling stream), '
                           'JSONL files of examples, or .txt files (README, "Evaluation"). '
                           'Without it: validation loss and bits per byte.')
_NUM_SHOTS = flags.DEFINE_integer('num_shots', 0, 'eval: demonstrations before each example.')
_LIMIT = flags.DEFINE_integer('limit', 0, 'eval: score the first N examples of each task (0: '
                              'all).')
_BATCH_SIZE = flags.DEFINE_integer('eval_batch_size', 32, 'eval: rows (choices, masked tokens, '
                                   'windows) or prompts per compiled call.')
_FEWSHOT_SEED = flags.DEFINE_integer('fewshot_seed', 1234, 'eval: seed of the demonstrations '
                                     "each example is shown (the same for every model; 0 or "
                                     'more).')
_MAX_LENGTH = flags.DEFINE_integer('max_length', 0, 'eval: context length in tokens (0: the '
                                   'length the run trained, min(data.seq_len, model.max_len); '
                                   'at most model.max_len).')
_OVERLAP = flags.DEFINE_integer('rolling_overlap', 0, 'eval: tokens consecutive windows of a '
                                'rolling task share (0: half the context; 1: disjoint windows, '
                                "as the validation pass's).")
_BEAM_SIZE = flags.DEFINE_integer('eval_beam_size', 0, 'eval: beam search with this many '
                                  'beams for generation tasks (0: greedy).')
_MAX_NEW_TOKENS = flags.DEFINE_integer('eval_max_new_tokens', 0, 'eval: tokens a generation '
                                       'task writes (0: twice the longest target + 8, at most '
                                       'half the context).')


def requested() -> bool:
  return bool(_TASKS.value)


def evaluate_tasks(config, workdir: str) -> dict:
  """The latest checkpoint of `workdir` on the --tasks (one JSON-ready dict)."""
  from evals import harness  # imports JAX's model code only when evaluating
  settings = harness.Settings(
      num_shots=_NUM_SHOTS.value, limit=_LIMIT.value, batch_size=_BATCH_SIZE.value,
      seed=_FEWSHOT_SEED.value, max_length=_MAX_LENGTH.value, overlap=_OVERLAP.value,
      beam_size=_BEAM_SIZE.value, max_new_tokens=_MAX_NEW_TOKENS.value)
  return harness.run(config, workdir, _TASKS.value, settings)
