"""Hugging Face `tokenizers` tokenizers (tokenizer.json) behind the `Tokenizer` interface,
and the tokenizer.json of this project's sentencepiece models, for export.

Special tokens come from tokenizer_config.json / special_tokens_map.json (pad, eos, unk,
bos, mask, cls, sep; additional / extra special tokens such as <extra_id_N>) and from
tokenizer.json's added tokens marked special. Missing ones follow Hugging Face's
conventions: no pad (GPT-2, Llama) pads with eos; no eos (BERT) ends documents with sep.
Files that name no special tokens at all (the hub's gpt2 and bert-base-* ship a bare
tokenizer_config.json) get their tokenizer class's defaults, as `transformers` does.

Bytes per token, by vocabulary:
  byte-level BPE (GPT-2)         exact: each character of a piece is one byte;
  '▁' / <0xNN> pieces (Llama,    exact per piece: '▁' is a space, <0xNN> one byte (but a
    T5's tokenizer.json)         dummy '▁' in front of the text counts a byte the text lacks);
  WordPiece (BERT)               approximate: the piece without '##', plus 1 for the space
                                 before a piece that starts a word (punctuation has none,
                                 and normalization, e.g. lowercasing or dropped accents,
                                 changes the text).
"""
import hashlib
import json
import os
import re

import numpy as np
import tokenizers

from input_pipeline.tokenizer import (HF_CONFIG_FILES, HF_FILE, SentencePieceTokenizer,
                                      SpecialIds, Tokenizer)

_NAMED = ('pad', 'eos', 'unk', 'bos', 'mask', 'cls', 'sep')
_BYTE_PIECE = re.compile(r'<0x([0-9A-Fa-f]{2})>')
# The special tokens a tokenizer class has when its files name none (transformers'
# GPT2Tokenizer, BertTokenizer and T5Tokenizer defaults), by the class's family.
_CLASS_DEFAULTS = {
    'gpt2': {'eos': '<|endoftext|>', 'bos': '<|endoftext|>', 'unk': '<|endoftext|>'},
    'bert': {'pad': '[PAD]', 'unk': '[UNK]', 'cls': '[CLS]', 'sep': '[SEP]', 'mask': '[MASK]'},
    't5': {'pad': '<pad>', 'eos': '</s>', 'unk': '<unk>'},
}


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's map of the 256 bytes to printable characters (byte-level BPE pieces)."""
  printable = [*range(ord('!'), ord('~') + 1), *range(ord('\xa1'), ord('\xac') + 1),
               *range(ord('\xae'), ord('\xff') + 1)]
  others = [b for b in range(256) if b not in printable]
  return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}


def _content(token) -> str | None:
  """A special token's text, written as a string or as an AddedToken dict."""
  if isinstance(token, dict):
    return token.get('content')
  return token if isinstance(token, str) else None


def _has_type(node, name: str) -> bool:
  """Whether a tokenizer.json component (nested dicts and lists) has a part of type `name`."""
  if isinstance(node, dict):
    return node.get('type') == name or any(_has_type(v, name) for v in node.values())
  if isinstance(node, list):
    return any(_has_type(v, name) for v in node)
  return False


class HFTokenizer(Tokenizer):
  """tokenizer.json and its config files in `directory`, run by the `tokenizers` library."""

  def __init__(self, directory: str):
    self.path = os.path.join(directory, HF_FILE)
    files = {}
    for name in (HF_FILE, *reversed(HF_CONFIG_FILES)):  # the config overrides the map
      if os.path.exists(os.path.join(directory, name)):
        with open(os.path.join(directory, name), 'rb') as f:
          files[name] = f.read()
    self.fingerprint = hashlib.sha256(
        b''.join(name.encode() + b'\0' + data for name, data in files.items())).hexdigest()[:16]
    config = {k: v for name in files if name != HF_FILE for k, v in json.loads(files[name]).items()}
    spec = json.loads(files[HF_FILE])
    self._tok = tokenizers.Tokenizer.from_str(files[HF_FILE].decode('utf-8'))
    self._tok.no_truncation()  # some files cap sequences (BERT's 512): documents are longer
    self._tok.no_padding()
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self.vocab_size = max(vocab.values()) + 1
    if _has_type(spec.get('pre_tokenizer'), 'ByteLevel') or _has_type(spec.get('decoder'),
                                                                      'ByteLevel'):
      self.kind = 'byte_level'
    elif spec['model'].get('type') == 'WordPiece':
      self.kind = 'wordpiece'
    else:
      self.kind = 'sentencepiece'
    self.special = self._special_ids(config, vocab)
    plain, marked = self._tok.encode('a', add_special_tokens=False).ids, self._tok.encode('a').ids
    self.adds_bos = (self.special.bos is not None and marked[:1] == [self.special.bos]
                     and plain[:1] != [self.special.bos])
    self.bytes_per_token, self.word_starts = self._piece_tables()

  def _class_defaults(self, config: dict) -> dict[str, str]:
    """The family's default special tokens when the files name none (module docstring):
    the family from tokenizer_class, else from the vocabulary's kind."""
    if any(_content(config.get(f'{key}_token')) for key in _NAMED):
      return {}
    name = (config.get('tokenizer_class') or '').lower()
    family = next((f for f in _CLASS_DEFAULTS if name.startswith(f)),
                  {'byte_level': 'gpt2', 'wordpiece': 'bert'}.get(self.kind))
    return _CLASS_DEFAULTS.get(family, {})

  def _special_ids(self, config: dict, vocab: dict[str, int]) -> SpecialIds:
    defaults = self._class_defaults(config)

    def token_id(key):
      content = _content(config.get(f'{key}_token')) or defaults.get(key)
      return None if content is None else vocab.get(content)

    named = {key: token_id(key) for key in _NAMED}
    eos = named['eos'] if named['eos'] is not None else named['sep']
    if eos is None:
      raise ValueError(f'{self.path} names no eos_token (nor sep_token) in its config files; '
                       'documents need an end token. Add eos_token to tokenizer_config.json.')
    listed = []
    for key in ('additional_special_tokens', 'extra_special_tokens'):
      tokens = config.get(key) or []
      listed += [_content(t) for t in (tokens.values() if isinstance(tokens, dict) else tokens)]
    added = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items()}
    special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
    special |= {vocab[c] for c in listed if c in vocab}
    special |= {i for i in named.values() if i is not None}
    special |= set(range(self.vocab_size)) - set(vocab.values())  # holes: never text
    sentinels = {}
    for content in [*added.values(), *listed]:
      found = re.fullmatch(r'<extra_id_(\d+)>', content or '')
      if found and content in vocab:
        sentinels[int(found[1])] = vocab[content]
    if sorted(sentinels) != list(range(len(sentinels))):
      raise ValueError(f'{self.path} has <extra_id_N> tokens {sorted(sentinels)}, not 0..N-1.')
    named['pad'] = named['pad'] if named['pad'] is not None else eos
    named['eos'] = eos
    return SpecialIds(special=tuple(sorted(special)),
                      sentinels=tuple(sentinels[i] for i in range(len(sentinels))), **named)

  def _piece_tables(self) -> tuple[np.ndarray, np.ndarray]:
    """(bytes per token, word starts) from each id's piece (module docstring)."""
    counts = np.zeros(self.vocab_size, np.int32)
    starts = np.zeros(self.vocab_size, bool)
    added, special = self._tok.get_added_tokens_decoder(), set(self.special.special)
    for i in range(self.vocab_size):
      piece = self._tok.id_to_token(i)
      if piece is None or i in special:
        starts[i] = True
        continue
      if i in added:  # an added ordinary token is matched in the raw text
        counts[i], starts[i] = len(piece.encode('utf-8')), True
      elif self.kind == 'byte_level':
        counts[i] = len(piece) if all(c in _BYTE_OF_CHAR for c in piece) else len(piece.encode())
        starts[i] = piece[0] in '\u0120\u010a'  # 'Ġ' a space, 'Ċ' a newline
      elif self.kind == 'wordpiece':
        continues = piece.startswith('##')
        counts[i] = len(piece[2:].encode('utf-8')) if continues else len(piece.encode('utf-8')) + 1
        starts[i] = not continues
      elif _BYTE_PIECE.fullmatch(piece):
        counts[i], starts[i] = 1, piece.upper() == '<0X0A>'  # a newline starts a word
      else:
        counts[i] = len(piece.replace('\u2581', ' ').encode('utf-8'))
        starts[i] = piece.startswith('\u2581')
    return counts, starts

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self._tok.decode(self._text_ids(ids), skip_special_tokens=True)

  def id_to_piece(self, i: int) -> str:
    return self._tok.id_to_token(i) or ''


# --- export of this project's sentencepiece models ------------------------------
def _from_sentencepiece(model_path: str) -> tokenizers.Tokenizer:
  """A `tokenizers` tokenizer that encodes as the sentencepiece model does (as
  transformers' converter builds one): '▁' for spaces, BPE merges ranked by piece score or
  the unigram scores, byte fallback, user-defined pieces ('\\n') kept whole."""
  from sentencepiece import sentencepiece_model_pb2
  from tokenizers import decoders, models, normalizers, pre_tokenizers
  proto = sentencepiece_model_pb2.ModelProto()
  with open(model_path, 'rb') as f:
    proto.ParseFromString(f.read())
  norm = proto.normalizer_spec
  if norm.precompiled_charsmap or norm.add_dummy_prefix or norm.remove_extra_whitespaces:
    raise ValueError(f'{model_path} normalizes text (a character map, a dummy prefix or '
                     'whitespace removal), which only this project\'s own models skip; export '
                     "the checkpoint's original tokenizer files instead.")
  pieces, trainer = proto.pieces, proto.trainer_spec
  normal, user_defined = 1, 4  # ModelProto.SentencePiece.Type
  kept_whole = sorted((p.piece for p in pieces if p.type == user_defined), key=len, reverse=True)
  if trainer.model_type == trainer.BPE:
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    scores = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == normal}
    ranked = sorted((-scores[piece][0], scores[piece][1], piece[:k], piece[k:])
                    for piece in scores for k in range(1, len(piece))
                    if piece[:k] in scores and piece[k:] in scores)
    model = models.BPE(vocab, [(left, right) for _, _, left, right in ranked],
                       unk_token=trainer.unk_piece, fuse_unk=True,
                       byte_fallback=trainer.byte_fallback, ignore_merges=bool(kept_whole))
  elif trainer.model_type == trainer.UNIGRAM:
    model = models.Unigram([(p.piece, p.score) for p in pieces], trainer.unk_id,
                           byte_fallback=trainer.byte_fallback)
  else:
    raise ValueError(f'{model_path}: only BPE and unigram sentencepiece models export.')
  tok = tokenizers.Tokenizer(model)
  tok.normalizer = normalizers.Replace(' ', '\u2581')
  if kept_whole:
    tok.pre_tokenizer = pre_tokenizers.Split(
        tokenizers.Regex('|'.join(re.escape(p) for p in kept_whole)), behavior='isolated')
  tok.decoder = decoders.Sequence([decoders.Replace('\u2581', ' '), decoders.ByteFallback(),
                                   decoders.Fuse()])
  return tok


def files_from_sentencepiece(tokenizer: SentencePieceTokenizer) -> dict[str, bytes]:
  """tokenizer.json, tokenizer_config.json and special_tokens_map.json for this project's
  sentencepiece model: file name -> contents."""
  tok = _from_sentencepiece(tokenizer.path)
  ids = tokenizer.special
  tok.add_special_tokens([tokenizers.AddedToken(tokenizer.id_to_piece(i), special=True,
                                                normalized=False) for i in ids.special])
  names = {f'{key}_token': tokenizer.id_to_piece(getattr(ids, key))
           for key in _NAMED if getattr(ids, key) is not None}
  named_ids = {getattr(ids, key) for key in _NAMED}
  extra = [tokenizer.id_to_piece(i) for i in ids.special if i not in named_ids]
  special_map = {**names, 'additional_special_tokens': extra}
  config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'clean_up_tokenization_spaces': False,
            'add_bos_token': False, 'add_eos_token': False, **special_map}
  dump = lambda obj: json.dumps(obj, indent=2, ensure_ascii=False).encode('utf-8')
  return {HF_FILE: tok.to_str(pretty=True).encode('utf-8'),
          HF_CONFIG_FILES[0]: dump(config), HF_CONFIG_FILES[1]: dump(special_map)}
