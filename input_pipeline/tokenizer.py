"""Tokenizers behind one interface, `Tokenizer`: this project's sentencepiece models,
T5's spiece.model with Hugging Face's extra ids, and Hugging Face `tokenizer.json` files
(hf_tokenizer.py). Special ids (pad, eos, [MASK], sentinels...) are the tokenizer's own:
code reads them from the tokenizer object (or its `special`), never from a table.

Every model this project trains (`train_tokenizer`) has the same table:
  0 pad, 1 eos (ends every document), 2 unk,
  3 [MASK], 4 [CLS], 5 [SEP]          (masked LM, next-sentence prediction)
  6..105 <extra_id_0>..<extra_id_99>  (T5 span-corruption sentinels)
  106..109 <|system|> <|user|> <|assistant|> <|end|>  (chat roles, input_pipeline/chat.py)
then ordinary pieces. The special pieces are sentencepiece control symbols, so no
text ever encodes to them, even text containing the literal string "[MASK]".
There is no bos and no dummy-prefix space, so decode(encode(text)) == text and the
bytes of the pieces add up to the bytes of the text (bits per byte is exact); byte
fallback (on by default) covers characters never seen in training.

A run's workdir holds its tokenizer (`load_tokenizer`), one of:
  tokenizer.model [+ tokenizer_extra.json]  sentencepiece; the JSON ({"extra_ids": N})
      adds T5's N sentinels after the model's pieces, as Hugging Face's T5 tokenizer does
  tokenizer.json [+ tokenizer_config.json, special_tokens_map.json]  Hugging Face's files
An imported sentencepiece tokenizer also keeps the checkpoint's own tokenizer files in
hf_tokenizer/, which `export_tokenizer` writes back.
"""
import dataclasses
import functools
import hashlib
import json
import os
import random
import re

import numpy as np
import sentencepiece as spm

# This project's own table, written into every model train_tokenizer makes (a loaded
# tokenizer reads its ids from its files; tests use these as known values).
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
MASK_ID, CLS_ID, SEP_ID = 3, 4, 5
NUM_SENTINELS = 100
SENTINEL_IDS = tuple(range(6, 6 + NUM_SENTINELS))
CHAT_MARKERS = ('<|system|>', '<|user|>', '<|assistant|>', '<|end|>')
NUM_SPECIAL = 6 + NUM_SENTINELS + len(CHAT_MARKERS)
CONTROL_SYMBOLS = (['[MASK]', '[CLS]', '[SEP]'] + [f'<extra_id_{i}>' for i in range(NUM_SENTINELS)]
                   + list(CHAT_MARKERS))

SENTENCEPIECE_FILE = 'tokenizer.model'
EXTRA_IDS_FILE = 'tokenizer_extra.json'
HF_FILE = 'tokenizer.json'
HF_CONFIG_FILES = ('tokenizer_config.json', 'special_tokens_map.json')
CHAT_TEMPLATE_FILE = 'chat_template.jinja'  # a checkpoint's own chat template (newer layout)
ORIGINALS_DIR = 'hf_tokenizer'
# A Hugging Face checkpoint's tokenizer files (what import keeps and export writes back).
_HF_TOKENIZER_FILES = ('spiece.model', 'tokenizer.model', HF_FILE, *HF_CONFIG_FILES,
                       CHAT_TEMPLATE_FILE, 'added_tokens.json', 'vocab.txt', 'vocab.json',
                       'merges.txt')


def sentinel_id(i: int) -> int:
  """The i-th sentinel of this project's own table (tests; code asks the tokenizer)."""
  return SENTINEL_IDS[i]


def train_tokenizer(texts: list[str], model_prefix: str, vocab_size: int, model_type: str = 'bpe',
                    byte_fallback: bool = True, max_train_bytes: int = 20_000_000) -> str:
  """Trains on lines of `texts` (sampled deterministically up to max_train_bytes);
  returns the path of the .model file."""
  lines = [line for text in texts for line in text.split('\n') if line.strip()]
  random.Random(0).shuffle(lines)
  sample, size = [], 0
  for line in lines:
    if size >= max_train_bytes:
      break
    sample.append(line)
    size += len(line.encode())
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample), model_prefix=model_prefix, vocab_size=vocab_size,
        model_type=model_type, byte_fallback=byte_fallback, character_coverage=0.9995,
        normalization_rule_name='identity', remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True, allow_whitespace_only_pieces=True,
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        control_symbols=CONTROL_SYMBOLS, user_defined_symbols=['\n'],
        max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as e:
    if 'Vocabulary size is smaller' in str(e):
      raise ValueError(f'data.tokenizer.vocab_size={vocab_size} is too small to hold the special '
                       'ids, the 256 byte pieces and the characters of this corpus; raise '
                       'data.tokenizer.vocab_size.') from e
    if 'Vocabulary size too high' in str(e):
      bound = re.search(r'<= (\d+)', str(e))
      raise ValueError(f'data.tokenizer.vocab_size={vocab_size} is too large for this corpus; '
                       'lower data.tokenizer.vocab_size'
                       + (f' to at most {bound[1]}.' if bound else '.')) from e
    raise
  return model_prefix + '.model'


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """A tokenizer's special ids. Hashable, so frozen tasks and jitted code can hold it as a
  static value. `special` is every id that is never ordinary text (the named ones,
  sentinels, other control tokens), sorted: masking never chooses or samples them."""
  pad: int
  eos: int
  special: tuple[int, ...] = ()
  unk: int | None = None
  bos: int | None = None
  mask: int | None = None
  cls: int | None = None
  sep: int | None = None
  sentinels: tuple[int, ...] = ()  # <extra_id_0>, <extra_id_1>, ... in that order

  def __post_init__(self):
    named = {self.pad, self.eos, self.unk, self.bos, self.mask, self.cls, self.sep} - {None}
    object.__setattr__(self, 'special', tuple(sorted(set(self.special) | named |
                                                     set(self.sentinels))))

  def is_special(self, ids) -> np.ndarray:
    return np.isin(ids, self.special)

  def num_ordinary(self, vocab_size: int) -> int:
    return vocab_size - int(np.sum(np.asarray(self.special) < vocab_size))

  def ordinary(self, k) -> np.ndarray:
    """The k-th ordinary id (0-based, elementwise): ids in order with the special ones
    skipped, so uniform k in [0, num_ordinary) is a uniform ordinary id."""
    special = np.asarray(self.special, np.int64)
    return k + np.searchsorted(special - np.arange(len(special)), k, side='right')


# This project's table as SpecialIds (tests of the array code use it as a fixed value).
TRAINED_SPECIAL_IDS = SpecialIds(PAD_ID, EOS_ID, tuple(range(NUM_SPECIAL)), unk=UNK_ID,
                                 mask=MASK_ID, cls=CLS_ID, sep=SEP_ID, sentinels=SENTINEL_IDS)


class Tokenizer:
  """What the rest of the code uses of a tokenizer; the backends fill it in.

  Set by each backend: `vocab_size` (ids, added tokens included), `special` (SpecialIds),
  `bytes_per_token` (int32 [V]: UTF-8 bytes each id stands for, 0 for special ids; bits
  per byte), `word_starts` (bool [V]: the piece begins a word; whole-word masking),
  `fingerprint` (changes with the files; keys token caches), `adds_bos` (sequences start
  with bos, as Llama's do) and `path` (the main file, for messages); `load_tokenizer`
  adds the checkpoint's `chat_template` where it ships one.
  """
  vocab_size: int
  special: SpecialIds
  bytes_per_token: np.ndarray
  word_starts: np.ndarray
  fingerprint: str
  adds_bos: bool = False
  path: str = ''
  chat_template: str | None = None  # an imported checkpoint's own (Jinja), input_pipeline/chat.py

  def encode(self, text: str) -> list[int]:
    """Ids of `text`, no special tokens added."""
    raise NotImplementedError

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [self.encode(text) for text in texts]

  def encode_with_special(self, text: str) -> list[int]:
    """Ids of `text` in which the special tokens' written forms (a chat template's
    '<s>', '<|im_end|>'...) stand for their ids; `encode` reads them as plain text."""
    if not self._special_pieces:
      return self.encode(text)
    pattern = '(' + '|'.join(re.escape(p) for p in sorted(self._special_pieces, key=len,
                                                          reverse=True) if p) + ')'
    ids = []
    for k, part in enumerate(re.split(pattern, text)):
      ids += [self._special_pieces[part]] if k % 2 else (self.encode(part) if part else [])
    return ids

  def decode(self, ids) -> str:
    """The text of `ids`, without pad and special ids (or ids past the vocabulary)."""
    raise NotImplementedError

  def _text_ids(self, ids) -> list[int]:
    """The ids `decode` keeps: ordinary ones of the vocabulary."""
    ids = [int(i) for i in ids]
    return [i for i in ids if 0 <= i < self.vocab_size and not self.special_mask[i]]

  def id_to_piece(self, i: int) -> str:
    raise NotImplementedError

  @property
  def pad_id(self) -> int:
    return self.special.pad

  @property
  def eos_id(self) -> int:
    return self.special.eos

  @property
  def unk_id(self) -> int | None:
    return self.special.unk

  @property
  def bos_id(self) -> int | None:
    return self.special.bos

  @property
  def mask_id(self) -> int | None:
    return self.special.mask

  @property
  def cls_id(self) -> int | None:
    return self.special.cls

  @property
  def sep_id(self) -> int | None:
    return self.special.sep

  @property
  def sentinel_ids(self) -> tuple[int, ...]:
    return self.special.sentinels

  @property
  def special_ids(self) -> tuple[int, ...]:
    return self.special.special

  @functools.cached_property
  def _special_pieces(self) -> dict[str, int]:
    return {self.id_to_piece(i): i for i in self.special_ids if i < self.vocab_size}

  def special_piece_id(self, piece: str) -> int | None:
    """The id of a special token written `piece` (e.g. a chat marker), None if the
    tokenizer has no such special token."""
    return self._special_pieces.get(piece)

  @functools.cached_property
  def special_mask(self) -> np.ndarray:
    """Bool [V]: ids that are never ordinary text."""
    return self.special.is_special(np.arange(self.vocab_size))


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model; with `extra_ids`, Hugging Face's T5 layout: <extra_id_i> is
  id sp_size + extra_ids - 1 - i, after the model's pieces (encode never produces them)."""

  def __init__(self, model_path: str, extra_ids: int = 0):
    self.path = model_path
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    self._sp_size = self._sp.get_piece_size()
    self.vocab_size = self._sp_size + extra_ids
    with open(model_path, 'rb') as f:
      digest = hashlib.sha256(f.read())
    if extra_ids:  # without extra ids, the fingerprint of the model file alone, as always
      digest.update(f'extra_ids={extra_ids}'.encode())
    self.fingerprint = digest.hexdigest()[:16]
    self.special = self._special_ids(extra_ids)
    self.adds_bos = self.special.bos is not None  # Llama's model has one; ours and T5's none
    self.bytes_per_token = self._bytes_per_token()
    self.word_starts = np.array([self._starts_word(i) for i in range(self.vocab_size)], bool)

  def _piece_id(self, piece: str) -> int | None:
    i = self._sp.piece_to_id(piece)  # the unk id when the model has no such piece
    return i if self._sp.id_to_piece(i) == piece and not self._sp.is_unknown(i) else None

  def _special_ids(self, extra_ids: int) -> SpecialIds:
    sp, optional = self._sp, lambda i: i if i >= 0 else None
    eos = optional(sp.eos_id())
    if eos is None:
      raise ValueError(f'The sentencepiece model {self.path} has no end-of-sequence piece '
                       '(eos_id); documents need one. Train it with an eos_id.')
    sentinels = []
    while (i := self._piece_id(f'<extra_id_{len(sentinels)}>')) is not None:
      sentinels.append(i)
    if sentinels and extra_ids:
      raise ValueError(f'{self.path} has its own <extra_id_N> pieces; drop its extra_ids.')
    sentinels += [self._sp_size + extra_ids - 1 - i for i in range(extra_ids)]
    controls = [i for i in range(self._sp_size) if sp.is_control(i) or sp.is_unknown(i)]
    return SpecialIds(
        pad=sp.pad_id() if sp.pad_id() >= 0 else eos, eos=eos,  # Llama's has no pad
        special=tuple(controls), unk=optional(sp.unk_id()), bos=optional(sp.bos_id()),
        mask=self._piece_id('[MASK]'), cls=self._piece_id('[CLS]'),
        sep=self._piece_id('[SEP]'), sentinels=tuple(sentinels))

  def _bytes_per_token(self) -> np.ndarray:
    """Exact for this project's models (no normalization, no dummy prefix); for T5's
    (NFKC, whitespace collapsed, a space in front of the text) approximate."""
    counts = np.zeros(self.vocab_size, np.int32)
    for i in range(self._sp_size):
      if self._sp.is_control(i) or self._sp.is_unknown(i):
        continue
      if self._sp.is_byte(i):
        counts[i] = 1
      else:
        counts[i] = len(self._sp.id_to_piece(i).replace('\u2581', ' ').encode('utf-8'))
    return counts

  def _starts_word(self, i: int) -> bool:
    """Pieces that begin a word: after a space or a newline, or special ones; byte pieces
    continue whatever came before (they spell out one character)."""
    if i >= self._sp_size or self._sp.is_control(i) or self._sp.is_unknown(i):
      return True  # special (extra ids are sentinels)
    if self._sp.is_byte(i):
      return False
    piece = self._sp.id_to_piece(i)
    return piece.startswith('\u2581') or piece == '\n'

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return self._sp.encode(texts, num_threads=os.cpu_count() or 1)

  def decode(self, ids) -> str:
    return self._sp.decode(self._text_ids(ids))

  def id_to_piece(self, i: int) -> str:
    if i >= self._sp_size:
      return f'<extra_id_{self.vocab_size - 1 - i}>'
    return self._sp.id_to_piece(i)


# --- a run's tokenizer files --------------------------------------------------
def tokenizer_file(workdir: str) -> str | None:
  """The file `load_tokenizer(workdir)` reads (tokenizer.model or tokenizer.json), or None."""
  for name in (SENTENCEPIECE_FILE, HF_FILE):
    if os.path.exists(os.path.join(workdir, name)):
      return os.path.join(workdir, name)
  return None


def load_tokenizer(workdir: str) -> Tokenizer:
  """The run's tokenizer: tokenizer.model (sentencepiece, with tokenizer_extra.json's extra
  ids) or else tokenizer.json (Hugging Face `tokenizers`, with its config files)."""
  path = tokenizer_file(workdir)
  if path is None:
    raise FileNotFoundError(f'{workdir} has no tokenizer: looked for {SENTENCEPIECE_FILE} and '
                            f'{HF_FILE}. Train a run there first, or import a checkpoint with '
                            f'python main.py --mode=import --from=HF_DIR --workdir={workdir}.')
  if path.endswith(HF_FILE):
    from input_pipeline.hf_tokenizer import HFTokenizer  # needs the `tokenizers` package
    tokenizer = HFTokenizer(workdir)
  else:
    extra_path = os.path.join(workdir, EXTRA_IDS_FILE)
    extra_ids = 0
    if os.path.exists(extra_path):
      with open(extra_path) as f:
        extra_ids = int(json.load(f)['extra_ids'])
    tokenizer = SentencePieceTokenizer(path, extra_ids)
  tokenizer.chat_template = _chat_template(workdir)
  return tokenizer


def _chat_template(workdir: str) -> str | None:
  """An imported checkpoint's own chat template (Jinja), where it ships one: in
  chat_template.jinja or tokenizer_config.json's "chat_template" (a string, or named
  templates of which 'default' is the one), beside tokenizer.json or among the
  originals of a sentencepiece tokenizer."""
  for directory in (workdir, os.path.join(workdir, ORIGINALS_DIR)):
    jinja = os.path.join(directory, CHAT_TEMPLATE_FILE)
    if os.path.exists(jinja):
      with open(jinja, encoding='utf-8') as f:
        return f.read()
    template = _read_json(os.path.join(directory, HF_CONFIG_FILES[0])).get('chat_template')
    if isinstance(template, list):
      template = {t.get('name'): t.get('template') for t in template}.get('default')
    if template:
      return template
  return None


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _is_t5_like(src_dir: str) -> bool:
  """A T5-family checkpoint (its spiece.model is the tokenizer, extra ids on top)."""
  model_type = _read_json(os.path.join(src_dir, 'config.json')).get('model_type', '')
  tokenizer_class = _read_json(os.path.join(src_dir, 'tokenizer_config.json')).get(
      'tokenizer_class') or ''
  return (model_type in ('t5', 'mt5', 'umt5')
          or re.match(r'(U?M)?T5Tok', tokenizer_class) is not None)


def _extra_ids(src_dir: str, t5_like: bool) -> int:
  """How many <extra_id_N> tokens Hugging Face's tokenizer adds after the sentencepiece
  pieces: tokenizer_config.json's extra_ids, else the <extra_id_N> tokens it lists, else
  T5's default of 100 (0 for other models)."""
  config = _read_json(os.path.join(src_dir, 'tokenizer_config.json'))
  if 'extra_ids' in config:
    return int(config['extra_ids'])
  named = set()
  for key in ('additional_special_tokens', 'extra_special_tokens'):
    tokens = config.get(key) or []
    for token in tokens.values() if isinstance(tokens, dict) else tokens:
      content = token.get('content', '') if isinstance(token, dict) else str(token)
      if re.fullmatch(r'<extra_id_\d+>', content):
        named.add(content)
  return len(named) if named else (100 if t5_like else 0)


def _write_file(data: bytes, path: str) -> None:
  """Writes `path` atomically; an existing file must already hold `data` (nothing a user
  wrote is overwritten)."""
  if os.path.exists(path):
    with open(path, 'rb') as f:
      if f.read() == data:
        return
    raise ValueError(f'{path} already exists and differs from the tokenizer being written; '
                     'use a fresh directory (or move that file away).')
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def _copy_file(src: str, dst: str) -> None:
  with open(src, 'rb') as f:
    _write_file(f.read(), dst)


def import_tokenizer(src_dir: str, workdir: str, kind: str | None = None) -> Tokenizer:
  """Copies a Hugging Face checkpoint directory's tokenizer into workdir; returns it.

  kind: 'sentencepiece' (spiece.model or tokenizer.model, plus the extra ids Hugging Face
  adds), 'tokenizers' (tokenizer.json and its config files), or None: sentencepiece for a
  T5-like checkpoint (config.json or tokenizer_config.json says so) or one without
  tokenizer.json, else tokenizers.
  """
  def path(name):
    return os.path.join(src_dir, name)
  sp_name = next((n for n in ('spiece.model', 'tokenizer.model') if os.path.exists(path(n))), None)
  has_json = os.path.exists(path(HF_FILE))
  if sp_name is None and not has_json:
    raise ValueError(f'{src_dir} has no tokenizer: looked for spiece.model, tokenizer.model and '
                     f'{HF_FILE}.')
  t5_like = _is_t5_like(src_dir)
  if kind is None:
    kind = 'sentencepiece' if sp_name and (t5_like or not has_json) else 'tokenizers'
  if kind not in ('sentencepiece', 'tokenizers'):
    raise ValueError(f"kind={kind!r}: use 'sentencepiece', 'tokenizers' or None.")
  if kind == 'sentencepiece' and sp_name is None:
    raise ValueError(f'{src_dir} has no sentencepiece model: looked for spiece.model and '
                     'tokenizer.model.')
  if kind == 'tokenizers' and not has_json:
    raise ValueError(f'{src_dir} has no {HF_FILE}.')
  existing = tokenizer_file(workdir)
  if existing and os.path.basename(existing) != (
      SENTENCEPIECE_FILE if kind == 'sentencepiece' else HF_FILE):
    raise ValueError(f'{workdir} already has a tokenizer ({existing}); import into a fresh '
                     '--workdir.')
  if kind == 'tokenizers':
    for name in (HF_FILE, *HF_CONFIG_FILES, CHAT_TEMPLATE_FILE):
      if os.path.exists(path(name)):
        _copy_file(path(name), os.path.join(workdir, name))
    return load_tokenizer(workdir)
  extra_ids = _extra_ids(src_dir, t5_like)
  _check_extra_ids(src_dir, path(sp_name), extra_ids)
  for name in _HF_TOKENIZER_FILES:  # the originals, for export
    if os.path.exists(path(name)):
      _copy_file(path(name), os.path.join(workdir, ORIGINALS_DIR, name))
  _copy_file(path(sp_name), os.path.join(workdir, SENTENCEPIECE_FILE))
  if extra_ids:
    _write_file(json.dumps({'extra_ids': extra_ids}).encode(),
                os.path.join(workdir, EXTRA_IDS_FILE))
  return load_tokenizer(workdir)


def _check_extra_ids(src_dir: str, model_path: str, extra_ids: int) -> None:
  """Where tokenizer.json numbers the <extra_id_N> tokens, they must be where the
  sentencepiece layout puts them."""
  added = _read_json(os.path.join(src_dir, HF_FILE)).get('added_tokens', [])
  size = spm.SentencePieceProcessor(model_file=model_path).get_piece_size()
  for token in added:
    found = re.fullmatch(r'<extra_id_(\d+)>', token.get('content', ''))
    if found and token['id'] != size + extra_ids - 1 - int(found[1]):
      raise ValueError(f"{src_dir}/{HF_FILE} gives {found[0]} id {token['id']}, not "
                       f'{size + extra_ids - 1 - int(found[1])} as after the {size} pieces of '
                       "its sentencepiece model; import it with kind='tokenizers'.")


def export_tokenizer(workdir: str, out_dir: str) -> list[str]:
  """Writes the run's tokenizer into out_dir as files `transformers.AutoTokenizer` loads
  (and that encode text to the same ids); returns their paths. An imported tokenizer
  goes back as it came; this project's sentencepiece model becomes a tokenizer.json.

  `AutoTokenizer` matches special tokens written literally in the text ("[MASK]", "</s>")
  to their ids; this project's sentencepiece encoding never does.
  """
  def read(path):
    with open(path, 'rb') as f:
      return f.read()

  originals = os.path.join(workdir, ORIGINALS_DIR)
  path = tokenizer_file(workdir)
  if os.path.isdir(originals):  # an imported sentencepiece model: the checkpoint's files
    files = {name: read(os.path.join(originals, name)) for name in sorted(os.listdir(originals))}
  elif path is not None and path.endswith(HF_FILE):  # an imported tokenizer.json, as it came
    files = {name: read(os.path.join(workdir, name))
             for name in (HF_FILE, *HF_CONFIG_FILES, CHAT_TEMPLATE_FILE)
             if os.path.exists(os.path.join(workdir, name))}
  else:  # this project's sentencepiece model (load_tokenizer raises when there is none)
    from input_pipeline import hf_tokenizer
    files = hf_tokenizer.files_from_sentencepiece(load_tokenizer(workdir))
  for name, data in files.items():
    _write_file(data, os.path.join(out_dir, name))
  return [os.path.join(out_dir, name) for name in files]
