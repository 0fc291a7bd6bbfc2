"""A small BERT (masked LM + next-sentence prediction) that trains on a laptop CPU in minutes.

python main.py --config=configs/bert_tiny.py --workdir=runs/bert_tiny
"""
from configs import gpt_tiny


def get_config():
  config = gpt_tiny.get_config()
  config.model.update(arch='encoder', position='learned', norm='layernorm', num_token_types=2,
                      d_ff=1024, activation='gelu_tanh', gated_mlp=False)  # a plain GELU MLP
  config.masked_lm.next_sentence = True
  config.train.update(steps=600, eval_every=200, checkpoint_every=200)
  return config
