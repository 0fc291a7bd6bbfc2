"""Corpora -> tokenizer (trained sentencepiece or imported) -> token cache -> packed,
sharded batches."""
from input_pipeline.pipeline import (Corpus, Data, Examples, build_data, load_corpus,
                                     pack_windows, segments_and_positions)
from input_pipeline.tokenizer import (SentencePieceTokenizer, SpecialIds, Tokenizer,
                                      export_tokenizer, import_tokenizer, load_tokenizer)
