"""Corpora -> sentencepiece tokenizer -> token cache -> packed, sharded batches."""
from input_pipeline.pipeline import (Corpus, Data, Examples, build_data, load_corpus,
                                     pack_windows, segments_and_positions)
from input_pipeline.tokenizer import (CLS_ID, EOS_ID, MASK_ID, NUM_SPECIAL, PAD_ID, SENTINEL_IDS,
                                      SEP_ID, UNK_ID, Tokenizer, sentinel_id)
