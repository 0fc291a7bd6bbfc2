"""Fine-tuning records: every schema error fails in one line naming the file and line (and what
to change), built-ins are checked against the task's kind, user files split the fixed way
corpora splits documents, and record_texts / corpus_fingerprint see what they should."""
import json
import logging

import pytest

from input_pipeline import bible_tasks
from input_pipeline import corpora
from input_pipeline import records

_GOOD = {
    'sft': {'messages': [{'role': 'system', 'content': 'Be brief.'},
                         {'role': 'user', 'content': 'Hi?'},
                         {'role': 'assistant', 'content': 'Hello.'}]},
    'classification': {'text': 'a verse', 'label': 'Law', 'text_pair': 'another'},
    'seq2seq': {'input': 'light', 'target': '光'},
    'dpo': {'prompt': 'Say hi.', 'chosen': 'Hi.', 'rejected': 'No.'},
}


def _write(path, *lines) -> str:
  path.write_text('\n'.join(line if isinstance(line, str) else json.dumps(line)
                            for line in lines) + '\n', encoding='utf-8')
  return str(path)


def _fails_on_one_line(call, *parts: str) -> str:
  with pytest.raises(ValueError) as error:
    call()
  message = str(error.value)
  assert '\n' not in message, message
  for part in parts:
    assert part in message, (part, message)
  return message


@pytest.mark.parametrize('kind, bad_line, expected', [
    ('classification', '{"text": "a", "label": 1', 'is not valid JSON'),
    ('classification', '["a", 1]', 'is an array, not a JSON object; classification records'),
    ('classification', {'text': 'a'}, "'label' is missing"),
    ('classification', {'label': 'Law'}, "'text' is missing"),
    ('classification', {'text': 'a', 'label': 1.5}, "'label' is a decimal number; write"),
    ('classification', {'text': 'a', 'label': True}, "'label' is a boolean"),
    ('classification', {'text': 'a', 'label': 1, 'text_pair': 2}, "'text_pair' is a number"),
    ('classification', {'text': '  ', 'label': 1}, "'text' is blank"),
    ('seq2seq', {'input': 'a', 'target': None}, "'target' is null, not a string"),
    ('dpo', {'prompt': 'a', 'chosen': 'b'}, "'rejected' is missing"),
    ('dpo', {'chosen': 'b', 'rejected': 'c'}, "'prompt' is missing; dpo records look like"),
    ('dpo', {'prompt': 3, 'chosen': 'b', 'rejected': 'c'},
     "'prompt' is a number; write it as a string or as messages"),
    ('dpo', {'prompt': [], 'chosen': 'b', 'rejected': 'c'}, "'prompt' is an empty array"),
    ('dpo', {'prompt': [{'role': 'bot', 'content': 'a'}], 'chosen': 'b', 'rejected': 'c'},
     'prompt[0] has role "bot"'),
    ('dpo', {'prompt': [{'role': 'user'}], 'chosen': 'b', 'rejected': 'c'},
     "prompt[0]'s 'content' is missing; dpo records look like"),
    ('dpo', {'prompt': [{'role': 'user', 'content': 'a'}, {'role': 'assistant', 'content': 'b'}],
             'chosen': 'b', 'rejected': 'c'}, "'prompt' ends with a assistant message"),
    ('dpo', {'prompt': 'a', 'chosen': 'b', 'rejected': ' '}, "'rejected' is blank"),
    ('dpo', {'prompt': 'a', 'chosen': 'b', 'rejected': 'b'},
     "'chosen' and 'rejected' are the same text"),
    ('sft', {'text': 'a'}, "has neither 'messages' nor 'prompt' and 'response'"),
    ('sft', {'prompt': 'a'}, "'response' is missing"),
    ('sft', {'messages': 'hi'}, "'messages' is a string, not an array; write it as ["),
    ('sft', {'messages': []}, "'messages' is an empty array"),
    ('sft', {'messages': ['hi']}, 'messages[0] is a string, not an object'),
    ('sft', {'messages': [{'content': 'a'}]}, "messages[0] has no 'role'"),
    ('sft', {'messages': [{'role': 'bot', 'content': 'a'}]},
     'messages[0] has role "bot"; use one of system, user, assistant'),
    ('sft', {'messages': [{'role': 'assistant'}]}, "messages[0]'s 'content' is missing"),
    ('sft', {'messages': [{'role': 'user', 'content': 'a'}, {'role': 'assistant', 'content': 3}]},
     "messages[1]'s 'content' is a number"),
    ('sft', {'messages': [{'role': 'user', 'content': 'a'}]}, 'has no assistant message'),
])
def test_each_schema_error_fails_on_one_line_naming_file_and_line(tmp_path, kind, bad_line,
                                                                  expected):
  path = _write(tmp_path / 'data.jsonl', _GOOD[kind], '', bad_line, _GOOD[kind])
  _fails_on_one_line(lambda: records.load_records(path, kind), f'{path}:3', expected)


def test_valid_records_load_with_extra_keys_blank_lines_and_a_byte_order_mark(tmp_path):
  for kind, good in _GOOD.items():
    path = tmp_path / f'{kind}.jsonl'
    _write(path, {**good, 'ref': 'Genesis 1:1'}, '   ', good)
    path.write_bytes(b'\xef\xbb\xbf' + path.read_bytes())
    assert records.load_records(str(path), kind) == [{**good, 'ref': 'Genesis 1:1'}, good]
  path = _write(tmp_path / 'pairs.jsonl', {'prompt': 'a', 'response': 'b'})
  assert records.load_records(path, 'sft') == [{'prompt': 'a', 'response': 'b'}]
  conversation = {**_GOOD['dpo'], 'prompt': _GOOD['sft']['messages'][:2]}
  path = _write(tmp_path / 'conversation.jsonl', conversation)
  assert records.load_records(path, 'dpo') == [conversation]
  path = _write(tmp_path / 'ints.jsonl', {'text': 'a', 'label': 0})
  assert records.load_records(path, 'classification') == [{'text': 'a', 'label': 0}]


def test_bytes_that_are_not_utf8_read_as_replacement_characters_with_a_warning(tmp_path,
                                                                               caplog):
  path = tmp_path / 'latin1.jsonl'
  path.write_bytes(b'{"input": "caf\xe9", "target": "lone \\udc80"}\n')
  with caplog.at_level(logging.WARNING):
    assert records.load_records(str(path), 'seq2seq') == [
        {'input': 'caf\ufffd', 'target': 'lone \ufffd'}]
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
      f'{path}: 2 character(s) on 1 line(s) (1) are not valid UTF-8; they read as U+FFFD. '
      'Re-encode the file as UTF-8 to keep them.']


def test_missing_empty_and_unsupported_files_fail_on_one_line(tmp_path):
  _fails_on_one_line(lambda: records.load_records(str(tmp_path / 'none*.jsonl'), 'sft'),
                     'matches no files', 'bible_instruct')
  blank = _write(tmp_path / 'blank.jsonl', '', '  ')
  _fails_on_one_line(lambda: records.load_records(blank, 'sft'), 'holds no record')
  text = _write(tmp_path / 'notes.txt', 'hello')
  _fails_on_one_line(lambda: records.load_records(text, 'sft'), f"'{text}' is not a .jsonl file")
  _fails_on_one_line(lambda: records.load_records(blank, 'chat'), "unknown record kind 'chat'")
  # A directory may hold other files (a README); its .jsonl files are read in path order.
  (tmp_path / 'dir').mkdir()
  _write(tmp_path / 'dir' / 'README.md', '# records')
  _write(tmp_path / 'dir' / 'b.jsonl', _GOOD['dpo'])
  _write(tmp_path / 'dir' / 'a.jsonl', {**_GOOD['dpo'], 'prompt': 'first'})
  assert [r['prompt'] for r in records.load_records(str(tmp_path / 'dir'), 'dpo')] == [
      'first', 'Say hi.']


def test_a_built_in_of_another_kind_fails_naming_the_one_that_fits():
  _fails_on_one_line(lambda: records.load_records('bible_genre', 'sft'),
                     "built-in 'bible_genre' holds classification records, not sft",
                     "for sft use 'bible_instruct'")
  _fails_on_one_line(lambda: records.record_splits('bible_en_ja', '', 0.1, 'dpo'),
                     "built-in 'bible_en_ja' holds seq2seq records, not dpo",
                     "for dpo use 'bible_prefs'")
  _fails_on_one_line(lambda: records.record_splits('bible_genre', 'bible_en_ja', 0.1,
                                                   'classification'),
                     "built-in 'bible_en_ja' holds seq2seq records")


def test_user_files_split_every_nth_record_the_same_way_every_time(tmp_path):
  path = _write(tmp_path / 'c.jsonl', *({'text': f'text {i}', 'label': i % 2} for i in range(10)))
  splits = records.record_splits(path, '', 0.2, 'classification')
  assert [r['text'] for r in splits['eval']] == ['text 4', 'text 9']
  assert len(splits['train']) == 8
  assert records.record_splits(path, '', 0.2, 'classification') == splits
  one = _write(tmp_path / 'one.jsonl', {'text': 'only', 'label': 0})
  assert records.record_splits(one, '', 0.2, 'classification') == {
      'train': [{'text': 'only', 'label': 0}], 'eval': [{'text': 'only', 'label': 0}]}
  _fails_on_one_line(lambda: records.record_splits(path, '', 1.5, 'classification'),
                     'data.eval_fraction=1.5')


def test_eval_corpus_is_the_eval_side_when_given(tmp_path):
  train = _write(tmp_path / 'train.jsonl', *({'text': f't{i}', 'label': 'Law'} for i in range(5)))
  held_out = _write(tmp_path / 'eval.jsonl', {'text': 'e', 'label': 'Law'})
  splits = records.record_splits(train, held_out, 0.5, 'classification')
  assert [r['text'] for r in splits['train']] == ['t0', 't1', 't2', 't3', 't4']
  assert splits['eval'] == [{'text': 'e', 'label': 'Law'}]
  # A built-in brings its held-out chapters, as the corpus or as the eval corpus.
  genre = bible_tasks.splits('bible_genre')
  assert records.record_splits('bible_genre', '', 0.5, 'classification') == genre
  assert records.record_splits('bible_genre', 'bible_genre', 0.5, 'classification') == genre
  assert records.record_splits(train, 'bible_genre', 0.5, 'classification')['eval'] == (
      genre['eval'])
  assert records.record_splits('bible_genre', held_out, 0.5, 'classification') == {
      'train': genre['train'], 'eval': [{'text': 'e', 'label': 'Law'}]}


def test_built_in_records_are_valid_records_of_their_kind():
  for name, kind in bible_tasks.BUILT_IN.items():
    for split, split_records in bible_tasks.splits(name).items():
      for i, record in enumerate(split_records):
        records.check_record(record, kind, f'{name} {split} {i}')


def test_record_texts_are_every_string_to_learn_from():
  assert records.record_texts(_GOOD['sft']) == ['Be brief.', 'Hi?', 'Hello.']
  assert records.record_texts({'prompt': 'p', 'response': 'r', 'id': 'x'}) == ['p', 'r']
  assert records.record_texts({'text': 't', 'text_pair': 'u', 'label': 3}) == ['t', 'u', '3']
  assert records.record_texts(_GOOD['seq2seq']) == ['light', '光']
  assert records.record_texts(_GOOD['dpo']) == ['Say hi.', 'Hi.', 'No.']
  conversation = {**_GOOD['dpo'], 'prompt': _GOOD['sft']['messages'][:2]}
  assert records.record_texts(conversation) == ['Be brief.', 'Hi?', 'Hi.', 'No.']
  assert records.record_texts({'text': 'v', 'label': 'Law', 'ref': 'Genesis 1:1'}) == ['v', 'Law']


def test_corpus_fingerprint_names_the_source(tmp_path, monkeypatch):
  path = _write(tmp_path / 'a.jsonl', _GOOD['dpo'])
  assert records.corpus_fingerprint(path) == corpora.corpus_fingerprint(path)
  fingerprints = {name: records.corpus_fingerprint(name) for name in bible_tasks.BUILT_IN}
  assert len(set(fingerprints.values())) == len(bible_tasks.BUILT_IN)
  assert records.corpus_fingerprint('bible_genre') == fingerprints['bible_genre']
  monkeypatch.setattr(bible_tasks, 'BUILD_VERSION', bible_tasks.BUILD_VERSION + 1)
  assert records.corpus_fingerprint('bible_genre') != fingerprints['bible_genre']
