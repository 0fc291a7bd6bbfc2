"""Instruction tuning (sft) and seq2seq: the chat template, loss only on the answers,
packing that keeps conversations apart, cuts from the left, and decoding that writes
what a memorised pair's teacher-forced argmax says."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tasks
from conftest import write_tiny_corpus
from input_pipeline.chat import ChatTemplate
from input_pipeline.tokenizer import SentencePieceTokenizer, train_tokenizer
from inference.generate import Request
from inference.sampling import Sampling
from models import ModelConfig
from tasks.seq2seq import scores

CONVERSATION = [
    {'role': 'system', 'content': 'You answer briefly.'},
    {'role': 'user', 'content': 'Who sees the bread?'},
    {'role': 'assistant', 'content': 'The cat sees the bread.'},
    {'role': 'user', 'content': 'And the gate?'},
    {'role': 'assistant', 'content': 'A dog finds the gate.'},
]
SEQ_LEN = 48


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  root = tmp_path_factory.mktemp('sft_tokenizer')
  corpus = write_tiny_corpus(root / 'corpus.jsonl')
  texts = [line for line in open(corpus)]
  return SentencePieceTokenizer(train_tokenizer(texts, str(root / 'sp'), 400))


def _cfg(arch: str, **changes) -> ModelConfig:
  return ModelConfig(arch=arch, vocab_size=512, num_layers=2, num_heads=2, num_kv_heads=2,
                     head_dim=16, d_model=32, d_ff=64, max_len=64, **changes)


def _batch(examples, rows):
  made = [examples.make_example(row, None) for row in rows]
  return {k: jnp.asarray(np.stack([m[k] for m in made])) for k in made[0]}


# --- the template --------------------------------------------------------------
def test_template_marks_roles_with_control_tokens_and_round_trips(tokenizer):
  template = ChatTemplate(tokenizer)
  assert template.uses_control_tokens
  ids, weights = template.render(CONVERSATION)
  assert template.parse(ids) == CONVERSATION
  assert not set(tokenizer.encode('<|user|> <|end|>')) & set(tokenizer.special_ids)
  # Weight 1 exactly on the answers' tokens and the <|end|> that closes each answer.
  weighted = [i for i, w in zip(ids, weights) if w]
  answers = [tokenizer.encode(m['content']) + [template.stop_id]
             for m in CONVERSATION if m['role'] == 'assistant']
  assert weighted == answers[0] + answers[1]
  assert template.prompt(CONVERSATION[:2])[-1] == template.marker_ids['assistant'][0]


def test_a_tokenizer_without_the_markers_writes_them_as_text(tmp_path):
  hf_fixtures = pytest.importorskip('hf_fixtures')
  pytest.importorskip('transformers')
  from input_pipeline.hf_tokenizer import HFTokenizer
  tokenizer = HFTokenizer(hf_fixtures.gpt2_tokenizer_dir(tmp_path / 'gpt2'))
  template = ChatTemplate(tokenizer)
  assert not template.uses_control_tokens
  ids, _ = template.render(CONVERSATION)
  assert template.parse(ids) == CONVERSATION
  assert tokenizer.decode(template.marker_ids['user']) == '<|user|>'
  # A message ends with eos: an answer stops at one token, never inside text like '->'.
  assert template.marker_ids['end'] == [template.stop_id] == [tokenizer.eos_id]


# --- loss only on the answers, packing, truncation -------------------------------
def test_only_answer_targets_change_the_loss_and_packed_conversations_stay_apart(tokenizer):
  task = tasks.for_model(_cfg('decoder'), 'sft')
  examples = task.examples(tokenizer, SEQ_LEN)
  short = {'prompt': 'Who sees?', 'response': 'The cat.'}
  rows = examples.rows([short, short])
  assert len(rows) == 1 and len(rows[0]) == 2  # both packed into one row
  batch = _batch(examples, rows)
  np.testing.assert_array_equal(np.unique(batch['segment_ids'][0]), [0, 1, 2])
  params = task.init(jax.random.key(0), batch)
  loss = lambda b: task.loss(params, b, None, False)[1]['loss']
  base = loss(batch)
  weights = np.asarray(batch['weights'][0])
  prompt_position = int(np.flatnonzero((weights == 0) & (np.asarray(batch['segment_ids'][0]) > 0))[1])
  answer_position = int(np.flatnonzero(weights)[0])
  bump = lambda key, i: batch | {key: batch[key].at[0, i].set((batch[key][0, i] + 7) % 400)}
  assert loss(bump('targets', prompt_position)) == base
  assert loss(bump('targets', answer_position)) != base
  # The second conversation's logits ignore every token of the first.
  logits = task.logits(params, batch)
  second = np.asarray(batch['segment_ids'][0]) == 2
  perturbed = task.logits(params, bump('inputs', prompt_position))
  np.testing.assert_array_equal(np.asarray(perturbed[0][second]), np.asarray(logits[0][second]))


def test_a_long_conversation_loses_its_first_tokens_and_is_counted(tokenizer, caplog):
  task = tasks.for_model(_cfg('decoder'), 'sft')
  examples = task.examples(tokenizer, 16)
  template = ChatTemplate(tokenizer)
  full, _ = template.render(CONVERSATION)
  with caplog.at_level(logging.INFO):
    rows = examples.rows([{'messages': CONVERSATION}])
  (inputs, targets, weights), = rows[0]
  assert len(inputs) == 16 and list(targets) == full[-16:]
  assert any('1 of 1 records are longer than data.seq_len=16' in r.getMessage()
             for r in caplog.records)


def test_registry_refuses_sft_for_an_encoder():
  with pytest.raises(ValueError, match="task='sft' needs model.arch='decoder' or "
                                       "'encoder_decoder', not 'encoder'"):
    from configs import default
    config = default.get_config()
    config.task, config.model.arch = 'sft', 'encoder'
    tasks.task_class(config)


# --- decoding what was memorised ---------------------------------------------------
@pytest.mark.parametrize('arch', ['decoder', 'encoder_decoder'])
def test_seq2seq_decoding_writes_the_teacher_forced_argmax_of_a_memorised_pair(tokenizer, arch):
  task = tasks.for_model(_cfg(arch), 'seq2seq')
  examples = task.examples(tokenizer, SEQ_LEN)
  pair = {'input': 'the old king greets', 'target': 'a small bird.'}
  batch = _batch(examples, examples.rows([pair]))
  params = jax.tree.map(lambda x: x, __import__('flax').linen.unbox(
      task.init(jax.random.key(1), batch)))
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(lambda p: task.loss(p, batch, None, False)[0])(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for _ in range(150):
    params, opt_state = step(params, opt_state)
  weights = np.asarray(batch['weights'][0]) > 0
  argmax = np.asarray(jnp.argmax(task.logits(params, batch)[0], -1))[weights]
  np.testing.assert_array_equal(argmax, np.asarray(batch['targets'][0])[weights])
  request = Request(max_new_tokens=24, sampling=Sampling(temperature=0.0))
  answer, = task.answer(params, tokenizer, [[{'role': 'user', 'content': pair['input']}]],
                        request)
  assert answer == tokenizer.decode(argmax) == pair['target']
  metrics = task.generation_metrics(params, tokenizer, [pair], limit=8)
  assert metrics['eval_exact_match'] == 100.0 and metrics['eval_chrf'] == 100.0


def test_scores_use_characters_for_text_without_spaces():
  assert scores(['a b c d'], ['a b c d']) == pytest.approx(
      {'eval_chrf': 100.0, 'eval_bleu': 100.0, 'eval_exact_match': 100.0})
  japanese = scores(['元始に神天地を創造たまへり'], ['元始に神天地を創造たまへりき'])
  assert 50 < japanese['eval_bleu'] < 100 and japanese['eval_exact_match'] == 0.0


LLAMA2_STYLE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] "
                "{{ m['content'] }} [/INST]{% elif m['role'] == 'assistant' %} {{ m['content'] }}"
                " {{ eos_token }}{% endif %}{% endfor %}")


@pytest.mark.parametrize('kind', ['gpt2', 'llama'])
def test_a_checkpoint_template_gives_transformers_ids_and_weights_its_answers(tmp_path, kind):
  """An imported tokenizer that ships a chat template renders with it: the same ids as
  transformers' apply_chat_template (byte-level and '▁' tokenizers alike), weight on each
  answer and the eos closing it, and prompts that are prefixes of what was trained."""
  hf_fixtures = pytest.importorskip('hf_fixtures')
  transformers = pytest.importorskip('transformers')
  from input_pipeline.tokenizer import import_tokenizer
  source = getattr(hf_fixtures, f'{kind}_tokenizer_dir')(tmp_path / kind)
  (tmp_path / kind / 'chat_template.jinja').write_text(LLAMA2_STYLE)
  tokenizer = import_tokenizer(source, str(tmp_path / 'run'))
  assert tokenizer.chat_template == LLAMA2_STYLE
  template = ChatTemplate(tokenizer)
  conversation = [m for m in CONVERSATION if m['role'] != 'system']
  ids, weights = template.render(conversation)
  hf = transformers.AutoTokenizer.from_pretrained(source)
  expected = hf.apply_chat_template(conversation, tokenize=True)
  assert ids == list(expected.get('input_ids', expected) if hasattr(expected, 'get') else expected)
  end = tokenizer.eos_id
  weighted = [i for i, w in zip(ids, weights) if w]
  assert weighted[-1] == end == template.stop_id and weights[-1] == 1.0
  text = tokenizer.decode(weighted)
  assert 'The cat sees the bread.' in text and 'A dog finds the gate.' in text
  assert 'INST' not in text and 'Who sees' not in text
  prompt = template.prompt(conversation[:1])
  assert prompt == ids[:len(prompt)] and weights[len(prompt)] == 1.0
  assert prompt == template.prompt(conversation[:3])[:len(prompt)]
