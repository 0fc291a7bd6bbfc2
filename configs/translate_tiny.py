"""English -> Japanese verse translation (seq2seq) with t5_tiny on the embedded
bible_en_ja pairs; eval decodes validation verses and reports chrF, BLEU (on
characters) and exact match. Its tokenizer is trained on both languages, with byte
fallback for characters it never saw.

python main.py --config=configs/translate_tiny.py --workdir=runs/translate_tiny
python main.py --mode=sample --workdir=runs/translate_tiny --greedy \\
    --prompt='In the beginning, God created the heavens and the earth.'
"""
from configs import t5_tiny


def get_config():
  config = t5_tiny.get_config()
  config.task = 'seq2seq'
  config.data.corpus = 'bible_en_ja'
  config.data.update(seq_len=128, batch_size=16)
  config.data.tokenizer.vocab_size = 8192  # two scripts: Latin and Japanese kana and kanji
  config.train.update(steps=600, lr=1e-3, warmup_steps=60, eval_every=200, eval_steps=10,
                      checkpoint_every=200, eval_decode_examples=64)
  return config
