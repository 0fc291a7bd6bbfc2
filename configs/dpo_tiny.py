"""Preference tuning (dpo) of an sft_tiny run on the embedded bible_prefs pairs (bible_instruct's
prompts, the true answer chosen over a plausible wrong one), minutes on a laptop CPU. The
sft run is both the starting point and the frozen reference, so it comes first:

  python main.py --config=configs/sft_tiny.py --workdir=runs/sft_tiny
  python main.py --config=configs/dpo_tiny.py --workdir=runs/dpo_tiny \\
      --config.init_from=runs/sft_tiny

eval_reward_accuracy is the share of held-out pairs whose chosen answer gains more over the
reference than the rejected one; eval_chosen_token_logp whether it became more likely
(--config.dpo.sft_weight=1.0 adds the chosen answers' NLL to the loss, which keeps them
nearly as likely as under the reference; README, "Preference tuning").
"""
from configs import sft_tiny


def get_config():
  config = sft_tiny.get_config()
  config.task = 'dpo'
  config.init_from = 'runs/sft_tiny'
  config.data.corpus = 'bible_prefs'
  config.data.batch_size = 8  # pairs: 16 sequences through the policy and the reference
  config.dpo.beta = 0.1
  # eval_steps covers every held-out pair (700 / 8 = 88 batches): one pass.
  config.train.update(steps=200, lr=1e-4, warmup_steps=20, weight_decay=0.0, log_every=10,
                      eval_every=50, eval_steps=100, checkpoint_every=50)
  return config
