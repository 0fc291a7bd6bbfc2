"""Tiny Hugging Face tokenizer directories of the four imported families, built offline.

Each function trains a small tokenizer (300-1000 ids) on the first chapters of the
default corpus, lays out its special tokens as that family's real checkpoints do, and
saves it with `transformers` into `directory` (created), returning the directory:

  gpt2_tokenizer_dir   byte-level BPE; <|endoftext|> is bos, eos and unk (the last id), no pad
  bert_tokenizer_dir   uncased WordPiece; [PAD] 0, [unused0..98] 1..99, [UNK] 100, [CLS] 101,
                       [SEP] 102, [MASK] 103 (bert-base-uncased's table)
  llama_tokenizer_dir  sentencepiece-style BPE ('▁' for spaces, <0xNN> byte fallback) as
                       Llama 2's tokenizer.json: <unk> 0, <s> 1 (added in front of every
                       sequence), </s> 2, the 256 byte pieces 3..258
  t5_tokenizer_dir     a sentencepiece unigram spiece.model (pad 0, eos 1, unk 2, no bos) with
                       100 <extra_id_i> sentinels after its pieces, saved by T5Tokenizer

Tests of tokenizer import (test_tokenizers.py) and of checkpoint import (a tiny random
`transformers` model saved into the same directory) share them. They need `transformers`
(a dev dependency): callers skip when it is missing.
"""
import functools
import os

from input_pipeline import corpora


@functools.lru_cache(maxsize=1)
def corpus_lines(count: int = 400) -> tuple[str, ...]:
  """The first `count` verses of the default corpus (enough text for a few hundred pieces)
  and a line of the digits and symbols the verses lack, as real vocabularies have them."""
  lines = [line for doc in corpora.load_documents('web_bible')[:60] for line in doc.split('\n')]
  return (*lines[:count], 'In 1 2 3 4 5 6 7 8 9 0 [10] 100% of $1,000 & #3.14! <a> * + = / _')


def _save(backend, directory: str, **special_tokens) -> str:
  from transformers import PreTrainedTokenizerFast
  os.makedirs(directory, exist_ok=True)
  PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens).save_pretrained(directory)
  return str(directory)


def gpt2_tokenizer_dir(directory, vocab_size: int = 600) -> str:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  tok.train_from_iterator(corpus_lines(), trainers.BpeTrainer(
      vocab_size=vocab_size - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  tok.add_special_tokens(['<|endoftext|>'])  # GPT-2's only special token, its last id
  end = '<|endoftext|>'
  return _save(tok, directory, bos_token=end, eos_token=end, unk_token=end)


BERT_SPECIAL = ['[PAD]'] + [f'[unused{i}]' for i in range(99)] + ['[UNK]', '[CLS]', '[SEP]',
                                                                  '[MASK]']


def bert_tokenizer_dir(directory, vocab_size: int = 700) -> str:
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
  from tokenizers import trainers
  trained = Tokenizer(models.WordPiece(unk_token='[UNK]'))
  trained.normalizer = normalizers.BertNormalizer(lowercase=True)
  trained.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  trained.train_from_iterator(corpus_lines(), trainers.WordPieceTrainer(
      vocab_size=vocab_size - len(BERT_SPECIAL), show_progress=False))
  pieces = sorted(trained.get_vocab().items(), key=lambda item: item[1])
  vocab = {piece: i for i, piece in enumerate(BERT_SPECIAL)}
  for piece, _ in pieces:
    vocab.setdefault(piece, len(vocab))
  tok = Tokenizer(models.WordPiece(vocab, unk_token='[UNK]'))
  tok.normalizer, tok.pre_tokenizer = trained.normalizer, trained.pre_tokenizer
  tok.decoder = decoders.WordPiece()
  tok.post_processor = processors.TemplateProcessing(
      single='[CLS] $A [SEP]', pair='[CLS] $A [SEP] $B:1 [SEP]:1',
      special_tokens=[('[CLS]', vocab['[CLS]']), ('[SEP]', vocab['[SEP]'])])
  return _save(tok, directory, pad_token='[PAD]', unk_token='[UNK]', cls_token='[CLS]',
               sep_token='[SEP]', mask_token='[MASK]')


def llama_tokenizer_dir(directory, vocab_size: int = 800) -> str:
  import json
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
  from tokenizers import trainers
  # Pieces are learnt within words ('▁' starts one), as sentencepiece learns them.
  trained = Tokenizer(models.BPE())
  trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement='\u2581', prepend_scheme='first')
  special = ['<unk>', '<s>', '</s>']
  trained.train_from_iterator(corpus_lines(), trainers.BpeTrainer(
      vocab_size=vocab_size - len(special) - 256, show_progress=False))
  model = json.loads(trained.to_str())['model']
  vocab = {piece: i for i, piece in enumerate(special + [f'<0x{b:02X}>' for b in range(256)])}
  for piece, _ in sorted(model['vocab'].items(), key=lambda item: item[1]):
    vocab.setdefault(piece, len(vocab))
  merges = [tuple(m.split(' ')) if isinstance(m, str) else tuple(m) for m in model['merges']]
  tok = Tokenizer(models.BPE(vocab, merges, unk_token='<unk>', fuse_unk=True, byte_fallback=True))
  # Llama 2's tokenizer.json: a '▁' in front of the text, every space a '▁', no pre-tokenizer.
  tok.normalizer = normalizers.Sequence([normalizers.Prepend('\u2581'),
                                         normalizers.Replace(' ', '\u2581')])
  tok.decoder = decoders.Sequence([decoders.Replace('\u2581', ' '), decoders.ByteFallback(),
                                   decoders.Fuse(), decoders.Strip(' ', 1, 0)])
  tok.post_processor = processors.TemplateProcessing(
      single='<s> $A', pair='<s> $A <s> $B', special_tokens=[('<s>', 1)])
  return _save(tok, directory, bos_token='<s>', eos_token='</s>', unk_token='<unk>')


def t5_tokenizer_dir(directory, vocab_size: int = 500, extra_ids: int = 100) -> str:
  import sentencepiece as spm
  from transformers import T5Tokenizer
  os.makedirs(directory, exist_ok=True)
  prefix = os.path.join(directory, 'spiece')
  # T5's settings: unigram, nmt_nfkc normalization, a dummy prefix, no bos.
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus_lines()), model_prefix=prefix, vocab_size=vocab_size,
      model_type='unigram', pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1,
      minloglevel=2)
  os.remove(prefix + '.vocab')
  T5Tokenizer.from_pretrained(str(directory), extra_ids=extra_ids).save_pretrained(directory)
  return str(directory)
