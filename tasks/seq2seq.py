"""Sequence-to-sequence fine-tuning (seq2seq) on input -> target records, e.g. English
-> Japanese verses: an encoder-decoder reads the input and writes the target (T5's
way: each ends in eos); a decoder reads the input as a user's message and writes the
target as the answer (the chat template of tasks/sft.py).

Evaluation adds decoding: the first `train.eval_decode_examples` validation records
are decoded (greedy, or beam search with `seq2seq.beam_size`) and scored against their
targets with chrF, BLEU (sacrebleu; character-level BLEU for text without spaces, e.g.
Japanese) and exact match, beside the chrF of a baseline that copies the input.
"""
import dataclasses

import ml_collections
import numpy as np
import sacrebleu

from inference.generate import Request
from inference.sampling import Sampling
from input_pipeline.chat import ChatTemplate
from input_pipeline.tokenizer import Tokenizer
from tasks.sft import Chat, SFTDecoder, SFTEncoderDecoder


def _without_spaces(texts: list[str]) -> bool:
  """Text written without spaces between words (Japanese, Chinese): under 5% spaces."""
  text = ''.join(texts)
  return bool(text) and text.count(' ') < 0.05 * len(text)


def scores(outputs: list[str], references: list[str]) -> dict[str, float]:
  """chrF, BLEU (character-level for text without spaces) and exact match, in percent."""
  tokenize = 'char' if _without_spaces(references) else '13a'
  bleu = sacrebleu.metrics.BLEU(tokenize=tokenize).corpus_score(outputs, [references])
  chrf = sacrebleu.metrics.CHRF().corpus_score(outputs, [references])
  exact = np.mean([o.strip() == r.strip() for o, r in zip(outputs, references)])
  return {'eval_chrf': float(chrf.score), 'eval_bleu': float(bleu.score),
          'eval_exact_match': float(100 * exact)}


class Translate(Chat):
  """What both families' seq2seq tasks share: records as a one-turn conversation, and
  the decoded evaluation."""
  record_kind = 'seq2seq'

  @classmethod
  def config_problem(cls, config: ml_collections.ConfigDict, selected: bool) -> str | None:
    if config.seq2seq.beam_size < 0:
      return (f'seq2seq.beam_size={config.seq2seq.beam_size} must be 0 (greedy) or a number '
              'of beams.')
    return None

  def conversation(self, record: dict) -> list[dict]:
    return [{'role': 'user', 'content': record['input']},
            {'role': 'assistant', 'content': record['target']}]

  def generation_metrics(self, params, tokenizer: Tokenizer, records: list[dict],
                         limit: int) -> dict[str, float]:
    records = records[:limit]
    if not records:
      return {}
    longest_target = max(len(tokenizer.encode(r['target'])) for r in records)
    max_new_tokens = min(2 * longest_target + 8, self.cfg.max_len // 2)
    request = Request(max_new_tokens=max_new_tokens, sampling=Sampling(temperature=0.0),
                      beam_size=self.beam_size)
    outputs = self.answer(params, tokenizer, [self.conversation(r)[:1] for r in records],
                          request, keep_last=self.prompt_room(max_new_tokens))
    references = [r['target'] for r in records]
    copied = scores([r['input'] for r in records], references)  # the input, unchanged
    return scores(outputs, references) | {'eval_chrf_copy_input': copied['eval_chrf']}


@dataclasses.dataclass(frozen=True)
class Seq2SeqDecoder(Translate, SFTDecoder):
  """A decoder writing the target as the answer to the input."""
  beam_size: int = 0

  name = 'seq2seq'

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, cfg) -> 'Seq2SeqDecoder':
    return cls(cfg, config.train.z_loss, beam_size=config.seq2seq.beam_size)

  def prompt_room(self, max_new_tokens: int) -> int:
    """Prompt tokens that fit before `max_new_tokens` new ones."""
    return self.cfg.max_len - max_new_tokens


@dataclasses.dataclass(frozen=True)
class Seq2SeqEncoderDecoder(Translate, SFTEncoderDecoder):
  """T5's fine-tuning: the encoder reads input + eos, the decoder writes target + eos."""
  beam_size: int = 0

  name = 'seq2seq'

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, cfg) -> 'Seq2SeqEncoderDecoder':
    return cls(cfg, config.train.z_loss, beam_size=config.seq2seq.beam_size)

  def prompt_ids(self, template: ChatTemplate, conversation: list[dict]) -> list[int]:
    return template.tokenizer.encode(conversation[-1]['content']) + [template.tokenizer.eos_id]

  def stop_id(self, template: ChatTemplate) -> int:
    return template.tokenizer.eos_id

  def to_pair(self, template: ChatTemplate, record: dict) -> tuple[list[int], list[int]]:
    eos = template.tokenizer.eos_id
    return (template.tokenizer.encode(record['input']) + [eos],
            template.tokenizer.encode(record['target']) + [eos])

  def prompt_room(self, max_new_tokens: int) -> int:
    return self.cfg.max_len  # the encoder's context
