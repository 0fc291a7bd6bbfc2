"""Sequence classification (issue #14): one label per record {"text", "label"[, "text_pair"]},
for an encoder (BERT) or a decoder (GPT); `--mode=predict` labels new records.

Rows (one record each, padded to data.seq_len):
  encoder  [CLS] text [SEP] (text_pair [SEP]), token types 0 for the first segment and
           1 for the pair; the head reads [CLS] (through BERT's pooler where the model
           has one, classification.pooler).
  decoder  (bos) text ([SEP] text_pair) eos ([SEP] is eos where the tokenizer has no
           [SEP]); the head reads the last real token, after the final norm.
A row longer than data.seq_len loses tokens at the end of its texts (of the longer one
first, for a pair); each split logs how many did.

Batches: 'inputs', 'segment_ids' (1 on real tokens, 0 on padding), 'positions'
[B, T] (and 'token_type_ids' for an encoder), 'targets' [B] (the label's index into
classification.labels) and 'weights' [B] (1 per record, 0 on an eval batch's padding
rows). The loss is softmax cross-entropy over the labels in float32 as sums: 'loss',
'correct', 'weight' (records), and at eval per-class sums 'class_{i}_tp',
'class_{i}_pred', 'class_{i}_true' for macro-F1 and 'label_bytes' (UTF-8 bytes of the
labels as written).

Eval results beside the loop's: eval_accuracy (from 'correct'), eval_macro_f1 (the mean
F1 over the labels that occur among the eval records or the predictions, as sklearn's
f1_score(average='macro')), eval_majority_baseline (the share of eval records whose label
is the training set's most frequent one) and eval_bits_per_byte, here the labels'
cross-entropy in bits per byte of the label as written (a classifier scores no text).
"""
import dataclasses
import functools
import math
from collections import Counter
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from inference.generate import Request
from input_pipeline.pipeline import RecordExamples
from input_pipeline.tokenizer import Tokenizer
from models.losses import cross_entropy_sums
from models.transformer import DecoderOnly, EncoderOnly
from tasks import base

Array = jax.Array
Label = str | int
PLACEHOLDER_LABELS = 2  # the head's size before the labels are read (--mode=estimate)
_MIN_BUCKET = 16  # predict pads each batch to a power of two of at least this many tokens


def label_order(label: Label):
  """Sort key of the labels read from data: integers in order, then strings."""
  return (isinstance(label, str), label)


def _name(record: dict, index: int, split: str) -> str:
  """A record in a message: its split, number and reference (or the start of its text)."""
  ref = record.get('ref')
  if not ref:
    text = str(record.get('text', ''))
    ref = repr(text if len(text) <= 40 else text[:37] + '...')
  return f'{split} record {index + 1} ({ref})'


def _shown(labels) -> str:
  shown = ', '.join(map(repr, labels[:10]))
  return shown + (f', ... ({len(labels)} in all)' if len(labels) > 10 else '')


def _fit(a: list[int], b: list[int] | None, budget: int) -> tuple[list, list | None, bool]:
  """The texts cut to `budget` tokens together, the longer one first; (a, b, cut)."""
  if b is None:
    return a[:budget], None, len(a) > budget
  if len(a) + len(b) <= budget:
    return a, b, False
  half = budget // 2
  if len(a) <= half:
    return a, b[:budget - len(a)], True
  if len(b) <= half:
    return a[:budget - len(b)], b, True
  return a[:budget - half], b[:half], True


class ClassificationExamples(RecordExamples):
  """One record per row (see the module docstring); `label_index` maps a label to its
  index (empty for unlabelled records: `encode` alone, as predict uses it)."""

  def __init__(self, seq_len: int, tokenizer: Tokenizer, encoder: bool, pair_type: int,
               label_index: dict):
    super().__init__(seq_len)
    self.tokenizer, self.encoder, self.pair_type = tokenizer, encoder, pair_type
    self.label_index = label_index
    if encoder and None in (tokenizer.cls_id, tokenizer.sep_id):
      raise ValueError('Classification with an encoder frames texts as [CLS] text [SEP] and '
                       'this tokenizer lacks [CLS] or [SEP]; use a tokenizer with both (this '
                       "project's, BERT's) or a decoder (model.arch='decoder').")

  def encode(self, records: list[dict]) -> list[tuple[np.ndarray, np.ndarray | None, bool]]:
    """(ids, token types or None, whether the texts were cut) of each record."""
    t = self.tokenizer
    texts = t.encode_batch([r['text'] for r in records])
    with_pair = [i for i, r in enumerate(records) if r.get('text_pair') is not None]
    pairs = dict(zip(with_pair, t.encode_batch([records[i]['text_pair'] for i in with_pair])))
    encoded = []
    for i, a in enumerate(texts):
      b = pairs.get(i)
      if self.encoder:
        a, b, cut = _fit(a, b, self.seq_len - 2 - (b is not None))
        ids = [t.cls_id, *a, t.sep_id] + ([] if b is None else [*b, t.sep_id])
        types = np.zeros(len(ids), np.int32)
        types[len(a) + 2:] = self.pair_type
      else:
        first = [t.bos_id] if t.adds_bos else []
        a, b, cut = _fit(a, b, self.seq_len - len(first) - 1 - (b is not None))
        separator = t.eos_id if t.sep_id is None else t.sep_id
        ids = first + a + ([] if b is None else [separator, *b]) + [t.eos_id]
        types = None
      encoded.append((np.asarray(ids, np.int32), types, cut))
    return encoded

  def log_cut(self, encoded: list, what: str) -> None:
    cut = sum(c for _, _, c in encoded)
    if cut:
      logging.info('classification: %d of %d %s are longer than data.seq_len=%d; their texts '
                   'lost tokens at the end.', cut, len(encoded), what, self.seq_len)

  def rows(self, records: list[dict]) -> list[tuple[np.ndarray, np.ndarray | None, int]]:
    encoded = self.encode(records)
    self.log_cut(encoded, 'records')
    rows = []
    for i, (record, (ids, types, _)) in enumerate(zip(records, encoded)):
      if record['label'] not in self.label_index:
        raise ValueError(f"{_name(record, i, 'a')} has label {record['label']!r}, which is not "
                         f'one of the run\'s labels ({_shown(list(self.label_index))}).')
      rows.append((ids, types, self.label_index[record['label']]))
    return rows

  def arrays(self, ids: np.ndarray, types: np.ndarray | None, length: int) -> dict:
    """One row's input arrays, padded to `length`."""
    real = (np.arange(length) < len(ids)).astype(np.int32)
    pad = lambda x: np.pad(x, (0, length - len(x))).astype(np.int32)
    example = {'inputs': pad(ids), 'segment_ids': real,
               'positions': np.arange(length, dtype=np.int32) * real}
    if self.encoder:
      example['token_type_ids'] = pad(types)
    return example

  def make_example(self, row, rng):
    del rng  # the same arrays every epoch
    ids, types, label = row
    return {**self.arrays(ids, types, self.seq_len), 'targets': np.int32(label),
            'weights': np.float32(1.0)}

  def row_tokens(self, row) -> int:
    return len(row[0])


@functools.partial(jax.jit, static_argnums=0)
def _probabilities(task: 'Classification', params, batch) -> Array:
  """Label probabilities [B, num_labels] of a batch (compiled once per shape)."""
  return jax.nn.softmax(task.apply(params, batch).astype(jnp.float32), axis=-1)


def _bucket(length: int, seq_len: int) -> int:
  """The padded length of a predict batch whose longest row has `length` tokens."""
  return min(seq_len, max(_MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length()))


@dataclasses.dataclass(frozen=True)
class Classification(base.Task):
  """What both families' classifiers share (ClassifierEncoder, ClassifierDecoder)."""
  labels: tuple = ()  # classification.labels: index i of the head is labels[i]
  label_counts: tuple = ()  # training records per label (the majority baseline)
  seq_len: int = 0  # data.seq_len: predict cuts texts as training did (0: cfg.max_len)

  # The init_from model has BERT's pooler: it was pre-trained with next-sentence prediction
  # (masked_lm.next_sentence), or imported with it. Read by --mode=estimate, which reads no
  # source (a run asks the source itself, train/frozen.py).
  source_pooler: bool = True

  name = 'classification'
  record_kind = 'classification'

  @property
  def new_modules(self) -> tuple[str, ...]:
    """No pre-trained model has the classifier; an encoder's pooler is new where its source
    has none (a LoRA run trains it in full)."""
    return ('classifier',) + (('pooler',) if self.cfg.nsp_head and not self.source_pooler
                              else ())

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, cfg) -> 'Classification':
    c = config.classification
    return cls(cfg, config.train.z_loss, labels=tuple(c.labels),
               label_counts=tuple(c.label_counts), seq_len=config.data.seq_len,
               source_pooler=config.masked_lm.next_sentence)

  @classmethod
  def config_problem(cls, config: ml_collections.ConfigDict, selected: bool) -> str | None:
    c = config.classification
    labels, counts = list(c.labels), list(c.label_counts)
    for label in labels:
      if isinstance(label, bool) or not isinstance(label, (str, int)):
        return (f'classification.labels holds {label!r}; a label is a string or an integer '
                '(or leave the list empty to read the labels from the training records).')
    repeated = [label for label, n in Counter(labels).items() if n > 1]
    if repeated:
      return f'classification.labels lists {repeated[0]!r} twice; list each label once.'
    if len(labels) == 1:
      return (f'classification.labels has the one label {labels[0]!r}; a classifier needs at '
              'least two.')
    if counts and len(counts) != len(labels):
      return (f'classification.label_counts has {len(counts)} entries for {len(labels)} '
              'classification.labels; give one count per label, or leave it empty to count '
              'the training records.')
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in counts):
      return (f'classification.label_counts={counts} must be counts (integers >= 0); leave it '
              'empty to count the training records.')
    return None

  @classmethod
  def model_fields(cls, config: ml_collections.ConfigDict) -> dict:
    # The labels are known once settle_config has read the training records; before that
    # (--mode=estimate reads no data) the head has a placeholder size.
    return {'num_labels': len(config.classification.labels) or PLACEHOLDER_LABELS,
            'nsp_head': cls.arch == 'encoder' and config.classification.pooler}

  @classmethod
  def settle_config(cls, config: ml_collections.ConfigDict, splits: dict) -> None:
    """classification.labels from the training records where empty (sorted), and
    label_counts where empty; a record whose label is not among them fails."""
    c = config.classification
    train = splits['train']
    counts = Counter(record['label'] for record in train)
    if not c.labels:
      if len(counts) < 2:
        raise ValueError(f'The training records have {len(counts)} label(s) '
                         f'({_shown(list(counts))}); a classifier needs at least two.')
      c.labels = sorted(counts, key=label_order)
    labels = list(c.labels)
    known = set(labels)
    for split in ('train', 'eval'):
      for i, record in enumerate(splits[split]):
        if record['label'] not in known:
          origin = ('which no training record has' if split == 'eval' else
                    'which classification.labels does not list')
          raise ValueError(f"{_name(record, i, split)} has label {record['label']!r}, {origin} "
                           f'(the labels: {_shown(labels)}); fix the record, or add the label '
                           'to the training records (and to classification.labels if set).')
    if not c.label_counts:
      c.label_counts = [counts[label] for label in labels]

  # --- the model --------------------------------------------------------------
  def model_inputs(self, batch):
    return batch['inputs'], batch['segment_ids'], batch['positions']

  def loss(self, params, batch, dropout_rng, train: bool):
    """Cross-entropy over the labels; at eval (train False) also the per-class sums."""
    logits_BK = self.apply(params, batch, train, dropout_rng)
    objective, sums = cross_entropy_sums(logits_BK, batch['targets'], batch['weights'],
                                         self.z_loss)
    if not train:
      sums.update(self.class_sums(logits_BK, batch['targets'], batch['weights']))
    return objective, sums

  def class_sums(self, logits_BK: Array, targets_B: Array, weights_B: Array) -> dict:
    """Per label i: predicted and true ('class_{i}_tp'), predicted ('_pred') and true
    ('_true') weights; and 'label_bytes', the UTF-8 bytes of the true labels."""
    num_labels = self.cfg.num_labels
    predicted_BK = jax.nn.one_hot(jnp.argmax(logits_BK, -1), num_labels) * weights_B[:, None]
    true_BK = jax.nn.one_hot(targets_B, num_labels) * weights_B[:, None]
    sums = {}
    for what, values_K in (('tp', jnp.sum(predicted_BK * true_BK, 0)),
                           ('pred', jnp.sum(predicted_BK, 0)), ('true', jnp.sum(true_BK, 0))):
      sums.update({f'class_{i}_{what}': values_K[i] for i in range(num_labels)})
    label_bytes_K = jnp.asarray(self.label_bytes(), jnp.float32)
    sums['label_bytes'] = jnp.sum(label_bytes_K[targets_B] * weights_B)
    return sums

  def label_bytes(self) -> list[int]:
    if len(self.labels) != self.cfg.num_labels:
      return [1] * self.cfg.num_labels
    return [len(str(label).encode()) for label in self.labels]

  def majority_index(self) -> int:
    """The training set's most frequent label (the first of the tied)."""
    counts = list(self.label_counts)
    return counts.index(max(counts)) if counts else 0

  def eval_metrics(self, means: dict[str, float]) -> dict[str, float]:
    if 'class_0_true' not in means:
      return {}
    f1 = []
    for i in range(self.cfg.num_labels):
      tp, predicted, true = (means[f'class_{i}_{w}'] for w in ('tp', 'pred', 'true'))
      if predicted + true > 0:
        f1.append(2 * tp / (predicted + true))
    results = {'eval_macro_f1': float(np.mean(f1)) if f1 else 0.0,
               'eval_majority_baseline': means[f'class_{self.majority_index()}_true']}
    if means.get('label_bytes'):
      results['eval_bits_per_byte'] = means['loss'] / means['label_bytes'] / math.log(2)
    return results

  def example_batch(self, batch_size: int, seq_len: int):
    ids = jnp.zeros((batch_size, seq_len), jnp.int32)
    batch = {'inputs': ids, 'segment_ids': ids + 1,
             'positions': jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), ids.shape),
             'targets': jnp.zeros((batch_size,), jnp.int32),
             'weights': jnp.ones((batch_size,), jnp.float32)}
    if self.arch == 'encoder':
      batch['token_type_ids'] = ids
    return batch

  def scored_length(self, seq_len: int) -> int:
    return 1  # one prediction per sequence

  # --- data -------------------------------------------------------------------
  def examples(self, tokenizer: Tokenizer, seq_len: int) -> ClassificationExamples:
    pair_type = 1 if self.cfg.num_token_types >= 2 else 0
    return ClassificationExamples(seq_len, tokenizer, self.arch == 'encoder', pair_type,
                                  {label: i for i, label in enumerate(self.labels)})

  # --- accounting -------------------------------------------------------------
  def param_counts(self) -> dict[str, int]:
    cfg = self.cfg
    D, K = cfg.d_model, cfg.num_labels
    head = cfg.final_norm * base.norm_params(cfg) + D * K + K  # final norm, classifier
    if self.arch == 'encoder' and cfg.nsp_head:
      head += D * D + D  # the pooler
    return {'embedding': cfg.vocab_size * D + base.input_params(cfg),
            self.stack: cfg.num_layers * base.block_params(cfg), 'head': head,
            **base.lora_part(cfg, cfg.num_layers)}

  def output_is_embedding(self) -> bool:
    return False  # the classifier replaces the vocabulary projection: a lookup only

  # --- predict ----------------------------------------------------------------
  def predict(self, params, tokenizer: Tokenizer, records: list[dict],
              batch_size: int) -> list[dict]:
    """Each record with 'predicted' (a label as the training data writes it) and
    'probabilities' ({label: p}; JSON keys are strings). Records are sorted by length and
    batched; a batch is padded to a power of two of tokens (at least 16, at most
    data.seq_len) and to batch_size rows, so it compiles a few times, not per record."""
    if len(self.labels) != self.cfg.num_labels:
      raise ValueError(f'The run has {len(self.labels)} classification.labels for a head of '
                       f"{self.cfg.num_labels}; predict with a trained run's config.json.")
    seq_len = self.seq_len or self.cfg.max_len
    examples = self.examples(tokenizer, seq_len)
    encoded = examples.encode(records)
    examples.log_cut(encoded, 'records to predict')
    order = sorted(range(len(records)), key=lambda i: len(encoded[i][0]))
    probabilities = np.zeros((len(records), self.cfg.num_labels), np.float32)
    for start in range(0, len(order), batch_size):
      chosen = order[start:start + batch_size]
      length = _bucket(max(len(encoded[i][0]) for i in chosen), seq_len)
      rows = [examples.arrays(*encoded[i][:2], length) for i in chosen]
      rows += [{k: np.zeros_like(v) for k, v in rows[0].items()}] * (batch_size - len(rows))
      batch = {k: np.stack([row[k] for row in rows]) for k in rows[0]}
      probabilities[chosen] = np.asarray(_probabilities(self, params, batch))[:len(chosen)]
    return [{**record, 'predicted': self.labels[int(np.argmax(p))],
             'probabilities': {str(label): float(q) for label, q in zip(self.labels, p)}}
            for record, p in zip(records, probabilities)]

  def complete(self, params, tokenizer: Tokenizer, prompts: list[str], request: Request,
               on_token: Callable | None = None) -> list[str]:
    raise ValueError("This run's task is classification, which generates no text; label "
                     'records with --mode=predict --input=F.jsonl.')


@dataclasses.dataclass(frozen=True)
class ClassifierEncoder(Classification):
  """BERT-style: the head on [CLS], through the pooler where the model has one."""
  arch = 'encoder'

  def module(self, train: bool):
    return EncoderOnly(self.cfg, deterministic=not train)

  def model_inputs(self, batch):
    return (batch['inputs'], batch['segment_ids'], batch['positions'],
            batch.get('token_type_ids'))


@dataclasses.dataclass(frozen=True)
class ClassifierDecoder(Classification):
  """GPT-style: the head on the last real token (eos), after the final norm."""
  arch = 'decoder'

  def module(self, train: bool):
    return DecoderOnly(self.cfg, deterministic=not train)
