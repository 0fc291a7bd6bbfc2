"""Each family trains through the same loop, its loss falls, and it resumes exactly."""
import json
import os
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from train import loop, metrics

pytestmark = pytest.mark.slow  # the end-to-end tier: runs that train, stop and resume

FAMILIES = {
    'encoder_nsp': dict(arch='encoder', next_sentence=True, position='learned'),
    'encoder_decoder': dict(arch='encoder_decoder', next_sentence=False, position='auto'),
}


def _configure(config, arch, next_sentence, position):
  config.model.update(arch=arch, position=position, dropout=0.1,
                      num_token_types=2 if next_sentence else 0)
  config.masked_lm.next_sentence = next_sentence
  config.train.update(steps=60, log_every=10, eval_every=30, checkpoint_every=20)
  return config


def _params(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  step = manager.latest_step()
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return step, state['state']['params']


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_family_trains_and_resumes_exactly(config, tmp_path, monkeypatch, family):
  config = _configure(config, **FAMILIES[family])
  straight = str(tmp_path / 'straight')
  last = loop.train_and_evaluate(config, straight)
  with open(os.path.join(straight, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert rows[-1]['loss'] < rows[0]['loss'] - 0.5, [r['loss'] for r in rows]
  assert 'eval_accuracy' in last
  if FAMILIES[family]['next_sentence']:
    assert 'nsp_loss' in rows[-1] and 'eval_nsp_accuracy' in last
    # --mode=sample on an encoder run fills the prompt's [MASK]s.
    from inference.fill_mask import fill_masks
    from inference.load import load_run
    from train import run_config
    task, params, tokenizer = load_run(run_config.saved_config(straight, []), straight)
    filled = fill_masks(task, params, tokenizer, ['The cat [MASK] the bread.'],
                        task.cfg.max_len)[0]
    assert filled.startswith('The cat ') and filled.endswith(' the bread.')
    assert '[MASK]' not in filled and len(filled) > len('The cat  the bread.')
  if FAMILIES[family]['arch'] == 'encoder_decoder':
    # --mode=sample on a T5 run writes a span for each [MASK], starting with its sentinel.
    from inference.fill_mask import fill_spans, span_prompt
    from inference.generate import generate
    from inference.load import load_run
    from input_pipeline.tokenizer import SENTINEL_IDS
    from train import run_config
    task, params, tokenizer = load_run(run_config.saved_config(straight, []), straight)
    prompt = span_prompt(tokenizer, 'The cat [MASK] the bread.')
    target = generate(task, params, [prompt], 8)[0]
    assert target[0] == SENTINEL_IDS[0], target
    filled = fill_spans(tokenizer, prompt, target)
    assert filled.startswith('The cat ') and filled.endswith(' the bread.'), filled

  # Stop with SIGTERM right after step 30 is logged (a checkpoint is saved), then resume.
  original_write = metrics.MetricsWriter.write

  def write_then_stop(self, step, scalars):
    original_write(self, step, scalars)
    if step == 30:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(metrics.MetricsWriter, 'write', write_then_stop)
  resumed = str(tmp_path / 'resumed')
  loop.train_and_evaluate(config, resumed)
  assert _params(resumed)[0] == 30
  monkeypatch.setattr(metrics.MetricsWriter, 'write', original_write)
  loop.train_and_evaluate(config, resumed)

  (step_a, params_a), (step_b, params_b) = _params(straight), _params(resumed)
  assert step_a == step_b == 60
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
