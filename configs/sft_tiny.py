"""Instruction tuning (sft) of gpt_tiny on the embedded bible_instruct conversations
(translate a verse, name its book or genre, continue or quote a verse), a few minutes
on a laptop CPU.

From scratch:     python main.py --config=configs/sft_tiny.py --workdir=runs/sft_tiny
From a pre-trained gpt_tiny run (its tokenizer and weights):
  python main.py --config=configs/sft_tiny.py --workdir=runs/sft_tiny \\
      --config.init_from=runs/gpt_tiny
Ask it:           python main.py --mode=sample --workdir=runs/sft_tiny --greedy \\
      --prompt='Which book is this verse from? "In the beginning, God created the heavens and the earth."'
"""
from configs import gpt_tiny


def get_config():
  config = gpt_tiny.get_config()
  config.task = 'sft'
  config.data.corpus = 'bible_instruct'
  config.data.update(seq_len=128, batch_size=16)
  config.train.update(steps=400, lr=5e-4, warmup_steps=20, eval_every=100, eval_steps=10,
                      checkpoint_every=100)
  return config
