"""Tokenizers of imported checkpoints (GPT-2, BERT, Llama, T5) and this project's own:
the same ids as `transformers`, special ids from the files, bytes per token, export."""
import json
import os

import numpy as np
import pytest

pytest.importorskip('tokenizers')
pytest.importorskip('transformers')

import hf_fixtures  # noqa: E402
from input_pipeline import masking, spans, token_cache  # noqa: E402
from input_pipeline import tokenizer as tokenizer_lib  # noqa: E402
from input_pipeline.hf_tokenizer import HFTokenizer  # noqa: E402
from input_pipeline.tokenizer import (  # noqa: E402
    SentencePieceTokenizer, SpecialIds, export_tokenizer, import_tokenizer, load_tokenizer)

TEXTS = [
    'In the beginning God created the heavens and the earth.',
    ' Café, Straße!  Ça va?\n\n\t中文 🙂 naïve — "quoted" 42\n',
    'Numbers: 0 7 42 1234567 3.14, and 1,000.',
    'line one\nline two\n\nline four',
    '  two leading spaces and two trailing  ',
    '',
]
PLAIN = 'in the beginning god created the heavens and the earth'  # normalizes to itself
KINDS = ('gpt2', 'bert', 'llama', 't5')


def _auto(directory):
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope='module')
def hf_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp('hf')
  return {kind: getattr(hf_fixtures, f'{kind}_tokenizer_dir')(root / kind) for kind in KINDS}


@pytest.fixture(scope='module')
def imported(hf_dirs, tmp_path_factory):
  root = tmp_path_factory.mktemp('workdirs')
  return {kind: import_tokenizer(hf_dirs[kind], str(root / kind)) for kind in KINDS}


def _hf_ids(hf, text):
  return hf(text, add_special_tokens=False).input_ids


def _check_named_ids(hf, tokenizer):
  """The same ids as transformers' where it has them."""
  for name in ('pad', 'eos', 'unk', 'bos', 'mask', 'cls', 'sep'):
    if getattr(hf, f'{name}_token_id') is not None:
      assert getattr(tokenizer, f'{name}_id') == getattr(hf, f'{name}_token_id'), name


@pytest.mark.parametrize('kind', KINDS)
def test_imported_tokenizer_encodes_and_decodes_as_transformers(hf_dirs, imported, kind):
  hf, tokenizer = _auto(hf_dirs[kind]), imported[kind]
  assert isinstance(tokenizer, SentencePieceTokenizer if kind == 't5' else HFTokenizer)
  assert tokenizer.vocab_size == len(hf)
  for text in TEXTS:
    ids = tokenizer.encode(text)
    assert ids == _hf_ids(hf, text), text
    assert tokenizer.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    if kind in ('gpt2', 'llama'):  # lossless: byte-level, or byte fallback
      assert tokenizer.decode(ids) == text
  assert tokenizer.encode_batch(TEXTS) == [tokenizer.encode(t) for t in TEXTS]
  assert tokenizer.decode(tokenizer.encode(TEXTS[0])) == (
      TEXTS[0].lower() if kind == 'bert' else TEXTS[0])
  # Special and out-of-vocabulary ids are dropped, as skip_special_tokens drops them.
  ids = tokenizer.encode(TEXTS[0])
  noisy = [tokenizer.pad_id, *ids[:3], tokenizer.eos_id, *ids[3:], tokenizer.vocab_size + 7]
  assert tokenizer.decode(noisy) == tokenizer.decode(ids)


@pytest.mark.parametrize('kind, expected', [
    # (pad, eos, unk, bos, mask, cls, sep, adds bos): GPT-2 pads with eos; BERT ends with [SEP]
    ('gpt2', (599, 599, 599, 599, None, None, None, False)),
    ('bert', (0, 102, 100, None, 103, 101, 102, False)),
    ('llama', (2, 2, 0, 1, None, None, None, True)),
    ('t5', (0, 1, 2, None, None, None, None, False)),
])
def test_special_ids_are_the_checkpoints(hf_dirs, imported, kind, expected):
  hf, tokenizer = _auto(hf_dirs[kind]), imported[kind]
  t = tokenizer
  assert (t.pad_id, t.eos_id, t.unk_id, t.bos_id, t.mask_id, t.cls_id, t.sep_id,
          t.adds_bos) == expected
  _check_named_ids(hf, t)
  assert set(hf.all_special_ids) <= set(t.special_ids)
  np.testing.assert_array_equal(np.flatnonzero(t.special_mask), t.special_ids)
  assert (t.bytes_per_token[list(t.special_ids)] == 0).all()
  if kind == 't5':  # <extra_id_i> is id sp_size + 100 - 1 - i, as in transformers
    assert t.sentinel_ids == tuple(hf.convert_tokens_to_ids(f'<extra_id_{i}>')
                                   for i in range(100))
    assert t.sentinel_ids[0] == 599 and t.sentinel_ids[99] == 500
    assert t.id_to_piece(599) == '<extra_id_0>'
    assert not set(t.encode('<extra_id_0> </s> <pad>')) & {*t.sentinel_ids, t.eos_id, t.pad_id}
  else:
    assert t.sentinel_ids == ()


def test_bert_table_is_bert_base_uncased(imported):
  bert = imported['bert']
  assert [bert.id_to_piece(i) for i in (0, 100, 101, 102, 103)] == [
      '[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
  assert not bert.special_mask[1:100].any()  # [unused*] are ordinary pieces, as in BERT


@pytest.mark.parametrize('kind', KINDS)
def test_bytes_per_token(imported, kind):
  """Exact for byte-level BPE; '▁' vocabularies count the dummy '▁' put in front of the
  text; WordPiece (and T5's normalizing sentencepiece) only approximate it."""
  tokenizer = imported[kind]
  total = lambda text: int(tokenizer.bytes_per_token[tokenizer.encode(text)].sum())
  if kind == 'gpt2':
    assert all(total(text) == len(text.encode()) for text in TEXTS)
  elif kind == 'llama':
    assert all(total(text) == len(text.encode()) + (text != '') for text in TEXTS)
  else:  # a space counted before the first word
    assert total(PLAIN) == len(PLAIN) + 1


@pytest.mark.parametrize('kind, starts_word', [
    ('gpt2', lambda piece: piece[0] in '\u0120\u010a'),
    ('bert', lambda piece: not piece.startswith('##')),
    ('llama', lambda piece: piece.startswith('\u2581') or piece == '<0x0A>'),
    ('t5', lambda piece: piece.startswith('\u2581')),
])
def test_word_starts(imported, kind, starts_word):
  tokenizer = imported[kind]
  ids = tokenizer.encode(' '.join(TEXTS[:4]))
  assert [tokenizer.word_starts[i] for i in ids] == [  # T5's <unk> is special: a start
      starts_word(tokenizer.id_to_piece(i)) or tokenizer.special_mask[i] for i in ids]
  assert tokenizer.word_starts[list(tokenizer.special_ids)].all()


@pytest.mark.parametrize('kind', KINDS)
def test_export_round_trips_through_transformers(imported, tmp_path, kind):
  tokenizer = imported[kind]
  written = export_tokenizer(os.path.dirname(tokenizer.path), str(tmp_path / 'out'))
  assert written and all(os.path.exists(p) for p in written)
  hf = _auto(str(tmp_path / 'out'))
  for text in TEXTS:
    assert _hf_ids(hf, text) == tokenizer.encode(text), text
  _check_named_ids(hf, tokenizer)
  assert set(hf.all_special_ids) <= set(tokenizer.special_ids)
  # Exporting again into the same directory is a no-op.
  assert export_tokenizer(os.path.dirname(tokenizer.path), str(tmp_path / 'out')) == written


@pytest.fixture(scope='module', params=['bpe', 'unigram'])
def project_workdir(request, tmp_path_factory):
  """A run directory holding a tokenizer trained by this project."""
  workdir = tmp_path_factory.mktemp(f'run_{request.param}')
  path = tokenizer_lib.train_tokenizer(list(hf_fixtures.corpus_lines()),
                                       str(workdir / 'trained'), 600, request.param)
  os.replace(path, workdir / 'tokenizer.model')
  return str(workdir)


def test_project_tokenizer_exports_to_transformers(project_workdir, tmp_path):
  tokenizer = load_tokenizer(project_workdir)
  assert isinstance(tokenizer, SentencePieceTokenizer)
  assert tokenizer.special == tokenizer_lib.TRAINED_SPECIAL_IDS
  export_tokenizer(project_workdir, str(tmp_path / 'out'))
  hf = _auto(str(tmp_path / 'out'))
  assert len(hf) == tokenizer.vocab_size
  for text in TEXTS:
    ids = tokenizer.encode(text)
    assert _hf_ids(hf, text) == ids, text
    assert hf.decode(ids) == text == tokenizer.decode(ids)
  assert (hf.pad_token_id, hf.eos_token_id, hf.unk_token_id, hf.bos_token_id) == (0, 1, 2, None)
  assert (hf.mask_token_id, hf.cls_token_id, hf.sep_token_id) == (3, 4, 5)
  assert hf.convert_tokens_to_ids(['<extra_id_0>', '<extra_id_99>']) == [6, 105]
  assert sorted(hf.all_special_ids) == list(range(110))  # chat markers 106..109 too


# --- files and errors --------------------------------------------------------------
def test_t5_checkpoint_uses_its_sentencepiece_model_unless_told_otherwise(hf_dirs, imported,
                                                                         tmp_path):
  workdir = os.path.dirname(imported['t5'].path)
  assert sorted(os.listdir(workdir)) == ['hf_tokenizer', 'tokenizer.model', 'tokenizer_extra.json']
  with open(os.path.join(workdir, 'tokenizer_extra.json')) as f:
    assert json.load(f) == {'extra_ids': 100}
  as_json = import_tokenizer(hf_dirs['t5'], str(tmp_path / 'json'), kind='tokenizers')
  assert isinstance(as_json, HFTokenizer)
  assert as_json.special == imported['t5'].special  # sentinels read from the added tokens
  assert as_json.encode(TEXTS[0]) == imported['t5'].encode(TEXTS[0])


def test_import_is_repeatable_and_never_overwrites(hf_dirs, tmp_path):
  workdir = str(tmp_path / 'run')
  first = import_tokenizer(hf_dirs['gpt2'], workdir)
  assert import_tokenizer(hf_dirs['gpt2'], workdir).fingerprint == first.fingerprint
  with pytest.raises(ValueError, match='already exists and differs'):
    import_tokenizer(hf_dirs['llama'], workdir)
  with pytest.raises(ValueError, match='already has a tokenizer'):
    import_tokenizer(hf_dirs['t5'], workdir)  # a sentencepiece model beside tokenizer.json
  assert load_tokenizer(workdir).fingerprint == first.fingerprint


def test_import_errors_name_the_files_looked_for(hf_dirs, tmp_path):
  with pytest.raises(ValueError, match='looked for spiece.model, tokenizer.model and '
                                       'tokenizer.json'):
    import_tokenizer(str(tmp_path), str(tmp_path / 'run'))
  with pytest.raises(ValueError, match='no sentencepiece model'):
    import_tokenizer(hf_dirs['gpt2'], str(tmp_path / 'run'), kind='sentencepiece')
  with pytest.raises(FileNotFoundError, match='looked for tokenizer.model and tokenizer.json'):
    load_tokenizer(str(tmp_path))


def test_truncation_saved_in_tokenizer_json_is_ignored(hf_dirs, tmp_path):
  import tokenizers
  source = tmp_path / 'src'
  source.mkdir()
  tok = tokenizers.Tokenizer.from_file(os.path.join(hf_dirs['gpt2'], 'tokenizer.json'))
  tok.enable_truncation(8)  # as some checkpoints ship it (BERT's 512)
  tok.save(str(source / 'tokenizer.json'))
  for name in ('tokenizer_config.json',):
    with open(os.path.join(hf_dirs['gpt2'], name)) as f:
      (source / name).write_text(f.read())
  tokenizer = import_tokenizer(str(source), str(tmp_path / 'run'))
  assert len(tokenizer.encode(TEXTS[0] * 3)) > 8


@pytest.mark.parametrize('kind', ['gpt2', 'bert'])
@pytest.mark.parametrize('tokenizer_class', [True, False], ids=['class_named', 'class_inferred'])
def test_files_that_name_no_special_tokens_get_the_class_defaults(hf_dirs, imported, tmp_path,
                                                                   kind, tokenizer_class):
  """The hub's gpt2 and bert-base-* tokenizer_config.json name no special tokens: the ids
  are the tokenizer class's defaults, as transformers gives them."""
  source = tmp_path / 'src'
  source.mkdir()
  with open(os.path.join(hf_dirs[kind], 'tokenizer.json')) as f:
    (source / 'tokenizer.json').write_text(f.read())
  bare = {'model_max_length': 512}
  if tokenizer_class:
    bare['tokenizer_class'] = {'gpt2': 'GPT2Tokenizer', 'bert': 'BertTokenizer'}[kind]
  (source / 'tokenizer_config.json').write_text(json.dumps(bare))
  tokenizer = HFTokenizer(str(source))
  assert tokenizer.special == imported[kind].special
  if tokenizer_class:
    _check_named_ids(_auto(str(source)), tokenizer)


# --- special ids reach the data --------------------------------------------------
def test_ordinary_ids_skip_the_special_ones():
  special = SpecialIds(pad=0, eos=5, special=(1, 2, 9), mask=7)
  assert special.special == (0, 1, 2, 5, 7, 9)
  n = special.num_ordinary(12)
  assert special.ordinary(np.arange(n)).tolist() == [3, 4, 6, 8, 10, 11]


def test_llama_documents_start_with_bos_and_end_with_eos(imported, tmp_path):
  llama = imported['llama']
  tokens, _ = token_cache.tokenized(lambda: ['first doc', 'second'], llama, str(tmp_path), 'k')
  assert list(tokens) == [1, *llama.encode('first doc'), 2, 1, *llama.encode('second'), 2]


def test_bert_masking_uses_its_own_mask_and_never_chooses_special_ids(imported):
  bert = imported['bert']
  ids = np.array(bert.encode(' '.join(TEXTS[:4]))[:60] + [bert.sep_id] + [bert.pad_id] * 4)
  rng = np.random.default_rng(0)
  for _ in range(50):
    out = masking.mask_tokens(ids, rng, bert.vocab_size, 0.3, bert.word_starts[ids],
                              special=bert.special)
    chosen = out['weights'] > 0
    assert chosen.any() and not bert.special_mask[ids[chosen]].any()
    changed = out['inputs'][chosen]
    assert set(changed[changed != ids[chosen]].tolist()) <= (
        {103} | set(np.flatnonzero(~bert.special_mask).tolist()))


def test_t5_span_corruption_writes_its_sentinels(imported):
  t5 = imported['t5']
  tokens = np.array(t5.encode(' '.join(TEXTS[:4])), np.int32)
  inputs, targets = spans.corrupt_spans(tokens, np.random.default_rng(0), special=t5.special)
  assert targets[0] == 599 and inputs[-1] == targets[-1] == t5.eos_id
  np.testing.assert_array_equal(spans.reconstruct(inputs, targets, special=t5.special), tokens)
