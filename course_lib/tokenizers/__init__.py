"""Step 2 — tokenizers: from words to bytes to GPT-2's 50,257 tokens.

* :class:`RegexTokenizer` — words and punctuation, a sorted vocabulary, ``<|unk|>`` and
  ``<|endoftext|>`` (``regex_tokenizer.py``).
* :class:`BPETokenizer` — byte-level BPE trained from scratch with GPT-2's pre-tokenizer,
  incremental pair counts, tiktoken-style special tokens, ``save``/``load`` (``bpe.py``).
* :class:`GPT2Tokenizer` — GPT-2's own vocabulary and merges, read from OpenAI's files;
  the same ids as ``tiktoken.get_encoding("gpt2")`` (``gpt2.py``).
* :func:`tiktoken_gpt2` — tiktoken's production ``Encoding`` for GPT-2, built offline from the
  course's data registry.
"""

from .bpe import GPT2_SPLIT_PATTERN, BPETokenizer, ByteLevelBPE, bytes_to_unicode
from .gpt2 import TIKTOKEN_GPT2_PATTERN, GPT2Tokenizer, tiktoken_gpt2
from .regex_tokenizer import ENDOFTEXT, UNK, WORD_SPLIT_PATTERN, RegexTokenizer

__all__ = ["RegexTokenizer", "BPETokenizer", "GPT2Tokenizer", "tiktoken_gpt2", "GPT2_SPLIT_PATTERN",
           "ByteLevelBPE", "bytes_to_unicode", "TIKTOKEN_GPT2_PATTERN", "WORD_SPLIT_PATTERN",
           "ENDOFTEXT", "UNK"]
