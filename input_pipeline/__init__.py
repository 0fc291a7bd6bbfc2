"""Corpora -> sentencepiece tokenizer -> token cache -> packed, sharded batches."""
from input_pipeline.pipeline import Data, build_data, pack_windows
from input_pipeline.tokenizer import (CLS_ID, EOS_ID, MASK_ID, NUM_SPECIAL, PAD_ID, SENTINEL_IDS,
                                      SEP_ID, UNK_ID, Tokenizer, sentinel_id)
