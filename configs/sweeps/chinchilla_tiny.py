"""A Chinchilla IsoFLOP sweep that runs on a 2-core CPU in well under an hour.

python main.py --mode=sweep --config=configs/sweeps/chinchilla_tiny.py --workdir=runs/sweep

Three budgets, 3e11 to 3e12 FLOPs, and five GPT sizes around each budget's
20-tokens-per-parameter optimum (N_opt/4 .. 4 N_opt, ~11K-660K parameters in
matmuls) on the built-in corpus with a 512-piece tokenizer. The fits, plots and
summary.md land in the workdir.
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  base = default.get_config()
  base.model.update(max_len=64, scan_layers=False)  # unrolled: faster on a CPU
  base.data.update(seq_len=64, batch_size=32)
  base.data.tokenizer.vocab_size = 512
  base.train.update(lr=3e-3, warmup_steps=50, log_every=50, eval_every=1000, eval_steps=10,
                    checkpoint_every=1000, keep_checkpoints=1)

  sweep = ml_collections.ConfigDict()
  sweep.base = base  # every run: this config with its model shape and train.steps
  sweep.budgets = [3e11, 1e12, 3e12]  # training FLOPs, C = 6 N D
  sweep.size_factors = [0.25, 0.5, 1.0, 2.0, 4.0]  # sizes as multiples of sqrt(C / 120)
  sweep.head_dim = 16  # model shapes from scaling/planner.py:model_shape
  sweep.aspect_ratio = 32.0  # d_model / num_layers
  sweep.max_loss_factor = 1.5  # a run whose loss passes 1.5 ln(vocab) has diverged
  sweep.launch = 'local'  # 'local': run here one after another; 'print': print one command per run
  return sweep
