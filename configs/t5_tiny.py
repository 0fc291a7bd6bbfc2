"""A small T5 (span corruption, relative position bias) that trains on a laptop CPU in minutes.

python main.py --config=configs/t5_tiny.py --workdir=runs/t5_tiny
"""
from configs import gpt_tiny


def get_config():
  config = gpt_tiny.get_config()
  config.model.update(arch='encoder_decoder', num_layers=2, position='relative', norm='rmsnorm',
                      d_ff=1024, activation='gelu_tanh', gated_mlp=False)  # a plain GELU MLP
  config.train.update(steps=600, eval_every=200, checkpoint_every=200)
  return config
