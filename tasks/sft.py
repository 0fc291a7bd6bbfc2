"""Supervised fine-tuning (sft) on conversations: a decoder learns the assistant's turns
of chat-formatted records (input_pipeline/chat.py); an encoder-decoder reads the
conversation up to the last answer and writes that answer.

Records: {"messages": [{"role", "content"}, ...]} or {"prompt", "response"}. The loss
is on the assistant's tokens only (weight 0 on everything else). A decoder packs
several conversations into a row with segment ids, so attention and targets never
cross from one to the next; a conversation longer than data.seq_len loses its first
tokens (the start of its context), and the run logs how many did.
"""
import dataclasses
import functools
from typing import Callable

import numpy as np
from absl import logging

from inference.generate import Request
from input_pipeline.chat import ChatTemplate, messages_of
from input_pipeline.pipeline import RecordExamples
from input_pipeline.tokenizer import Tokenizer
from tasks import base
from tasks.causal_lm import CausalLM
from tasks.span_corruption import SpanCorruption


def _log_cut(kind: str, cut: int, total: int, seq_len: int, side: str) -> None:
  if cut:
    logging.info('%s: %d of %d records are longer than data.seq_len=%d and lost tokens at the '
                 '%s.', kind, cut, total, seq_len, side)


class PackedExamples(RecordExamples):
  """Token sequences with per-token loss weights, `to_sequence(record) -> (ids, weights)`,
  packed in order into rows of seq_len inputs: each sequence gives inputs ids[:-1],
  targets ids[1:] and their weights weights[1:]; a row holds whole sequences only."""

  def __init__(self, seq_len: int, to_sequence: Callable[[dict], tuple[list, list]],
               kind: str):
    super().__init__(seq_len)
    self.to_sequence, self.kind = to_sequence, kind

  def single_row(self, record: dict) -> tuple[list[tuple[np.ndarray, ...]], bool]:
    """The row of `record` alone, and whether it lost its first tokens."""
    ids, weights = self.to_sequence(record)
    # Turns after the last answer carry no loss; a long one must not push the answers out.
    end = 1 + max((i for i, w in enumerate(weights) if w), default=len(ids) - 1)
    ids, weights = ids[:end], weights[:end]
    cut = len(ids) - 1 > self.seq_len
    if cut:  # keep the end: the answer, and as much context as fits
      ids, weights = ids[-self.seq_len - 1:], weights[-self.seq_len - 1:]
    return [(np.asarray(ids[:-1], np.int32), np.asarray(ids[1:], np.int32),
             np.asarray(weights[1:], np.float32))], cut

  def rows(self, records: list[dict]) -> list[list[tuple[np.ndarray, ...]]]:
    rows, row, used, cut = [], [], 0, 0
    for record in records:
      (sequence,), was_cut = self.single_row(record)
      cut += was_cut
      if used + len(sequence[0]) > self.seq_len:
        rows.append(row)
        row, used = [], 0
      row.append(sequence)
      used += len(sequence[0])
    if row:
      rows.append(row)
    _log_cut(self.kind, cut, len(records), self.seq_len, 'start')
    return rows

  def make_example(self, row, rng):
    del rng  # the same arrays every epoch
    length = self.seq_len
    pad = lambda x, dtype: np.pad(np.concatenate(x).astype(dtype), (0, length - used))
    used = sum(len(inputs) for inputs, _, _ in row)
    return {'inputs': pad([s[0] for s in row], np.int32),
            'targets': pad([s[1] for s in row], np.int32),
            'weights': pad([s[2] for s in row], np.float32),
            'segment_ids': pad([np.full(len(s[0]), i + 1) for i, s in enumerate(row)], np.int32),
            'positions': pad([np.arange(len(s[0])) for s in row], np.int32)}

  def row_tokens(self, row) -> int:
    return sum(len(inputs) for inputs, _, _ in row)


class PairExamples(RecordExamples):
  """One (encoder ids, target ids) pair per row, `to_pair(record)`: the encoder input cut
  to its last seq_len tokens, the target to its first seq_len."""

  def __init__(self, seq_len: int, to_pair: Callable[[dict], tuple[list, list]], pad_id: int,
               kind: str):
    super().__init__(seq_len)
    self.to_pair, self.pad_id, self.kind = to_pair, pad_id, kind

  def single_row(self, record: dict) -> tuple[tuple[np.ndarray, np.ndarray], bool]:
    """The row of `record`, and whether it lost tokens."""
    source, target = self.to_pair(record)
    return ((np.asarray(source[-self.seq_len:], np.int32),
             np.asarray(target[:self.seq_len], np.int32)),
            len(source) > self.seq_len or len(target) > self.seq_len)

  def rows(self, records: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    rows, cut = [], 0
    for record in records:
      row, was_cut = self.single_row(record)
      rows.append(row)
      cut += was_cut
    _log_cut(self.kind, cut, len(records), self.seq_len, 'start of the input or the end of '
             'the target')
    return rows

  def make_example(self, row, rng):
    del rng
    source, target = row
    s = self.seq_len
    pad = lambda x: np.pad(x, (0, s - len(x))).astype(np.int32)
    real = lambda x: (np.arange(s) < len(x)).astype(np.int32)
    decoder_inputs = np.concatenate([[self.pad_id], target[:-1]])  # T5 starts from pad
    return {'encoder_inputs': pad(source), 'encoder_segment_ids': real(source),
            'encoder_positions': np.arange(s, dtype=np.int32) * real(source),
            'decoder_inputs': pad(decoder_inputs), 'decoder_segment_ids': real(target),
            'decoder_positions': np.arange(s, dtype=np.int32) * real(target),
            'targets': pad(target), 'weights': real(target).astype(np.float32)}

  def row_tokens(self, row) -> int:
    return len(row[0]) + len(row[1])


@functools.lru_cache(maxsize=4)
def _template(tokenizer: Tokenizer) -> ChatTemplate:
  """The tokenizer's chat template, made once (evals/ asks for its stop id per row)."""
  return ChatTemplate(tokenizer)


class Chat:
  """What both families' sft tasks share: the records' conversations, and answering
  (`--mode=sample` answers each prompt as a user's message). Evaluation tasks (evals/)
  are raw text in both families, as for a pre-trained model, never the chat template; a
  tuned model's generation stops where its training answers stop (`generation_stop_ids`)."""
  streams = False  # the answer is printed whole

  def conversation(self, record: dict) -> list[dict]:
    return messages_of(record)

  def decoding_task(self, tokenizer: Tokenizer):
    return self

  def prompt_ids(self, template: ChatTemplate, conversation: list[dict]) -> list[int]:
    return template.prompt(conversation)

  def stop_id(self, template: ChatTemplate) -> int:
    return template.stop_id

  def generation_stop_ids(self, tokenizer: Tokenizer) -> tuple[int, ...]:
    """What closes a training answer (`stop_id`: <|end|>, or eos), then eos: a tuned
    model continuing raw text may end either way."""
    return tuple(dict.fromkeys((self.stop_id(_template(tokenizer)), tokenizer.eos_id)))

  def answer(self, params, tokenizer: Tokenizer, conversations: list[list[dict]],
             request: Request, keep_last: int | None = None) -> list[str]:
    """The assistant's next turn in each conversation (each prompt cut to its last
    `keep_last` tokens if given)."""
    template = ChatTemplate(tokenizer)
    prompts = [self.prompt_ids(template, c)[-keep_last if keep_last else 0:]
               for c in conversations]
    return [tokenizer.decode(ids) for ids in base.continuations(
        self.decoding_task(tokenizer), params, prompts, request, self.stop_id(template))]

  def complete(self, params, tokenizer: Tokenizer, prompts: list[str], request: Request,
               on_token: Callable | None = None) -> list[str]:
    """Each prompt's answer (a user's message), cut at the first stop string."""
    answers = self.answer(params, tokenizer, [[{'role': 'user', 'content': p}] for p in prompts],
                          request)
    for stop in request.stop:
      answers = [a.split(stop)[0] for a in answers]
    return answers


@dataclasses.dataclass(frozen=True)
class SFTDecoder(Chat, CausalLM):
  """A decoder fine-tuned on conversations."""
  name = 'sft'
  record_kind = 'sft'

  def examples(self, tokenizer: Tokenizer, seq_len: int) -> PackedExamples:
    template = ChatTemplate(tokenizer)
    return PackedExamples(seq_len, lambda r: template.render(self.conversation(r)),
                          self.record_kind)


@dataclasses.dataclass(frozen=True)
class SFTEncoderDecoder(Chat, SpanCorruption):
  """An encoder-decoder fine-tuned on conversations: the encoder reads the conversation
  up to its last assistant turn (rendered with the chat template, ending in the
  assistant's marker), the decoder writes that turn and `<|end|>`."""
  name = 'sft'
  record_kind = 'sft'

  def to_pair(self, template: ChatTemplate, record: dict) -> tuple[list[int], list[int]]:
    messages = self.conversation(record)
    last = max(i for i, m in enumerate(messages) if m['role'] == 'assistant')
    return (self.prompt_ids(template, messages[:last]),
            template.answer_ids(messages[last]['content']))

  def examples(self, tokenizer: Tokenizer, seq_len: int) -> PairExamples:
    template = ChatTemplate(tokenizer)
    return PairExamples(seq_len, lambda r: self.to_pair(template, r), tokenizer.pad_id,
                        self.record_kind)

  @classmethod
  def config_problem(cls, config, selected: bool) -> str | None:
    return None  # no settings of its own (span_corruption's are checked with that task)

  def decoding_task(self, tokenizer: Tokenizer):
    return dataclasses.replace(self, decoder_start_id=tokenizer.pad_id)

  def scoring_pair(self, tokenizer: Tokenizer, context: list[int],
                   continuation: list[int]) -> tuple[list[int], list[int], int]:
    """Fine-tuned, it reads the context (and eos) and writes the continuation and what
    closes its training targets (<|end|>, or eos: `generation_stop_ids`), all scored, as
    T5's rank classification scores a target and its eos: no sentinel."""
    closing = self.generation_stop_ids(tokenizer)[0]
    return context + [tokenizer.eos_id], continuation + [closing], 0

  def train_batch(self, batch_size: int, seq_len: int):
    return self.example_batch(batch_size, seq_len)

  def scored_length(self, seq_len: int) -> int:
    return seq_len
