"""A tiny byte-level BPE tokenizer trained offline on a built-in corpus, wrapped as a transformers fast
tokenizer with bos/eos/pad tokens and a chat template. Any text encodes (byte-level), nothing downloads."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (PAD, BOS, EOS)   # ids 0, 1, 2

# Role-tagged turns; ``add_generation_prompt`` opens an assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = """\
A mixture of experts layer sends every token to a few of its experts. The router scores all experts
and keeps the best k. Experts that run often are worth keeping on the GPU; the rest run on the CPU.
Hybrid inference splits each layer's experts between the two devices so that both finish together.
The cache keeps recently used experts resident and evicts the ones least likely to be needed soon.
A prefetcher looks ahead one or more layers and copies experts before they are asked for.
user: What is the capital of France? assistant: The capital of France is Paris.
user: Write a short poem about the sea. assistant: The sea is wide, the sea is deep, its waves roll on.
user: How many legs does a spider have? assistant: A spider has eight legs.
system: You are a helpful assistant. Answer briefly and clearly.
The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 100 1000.
def forward(self, x): return self.down(self.act(self.gate(x)) * self.up(x))
"""


def build_tokenizer(vocab_size: int = 384) -> Any:
    """A ``PreTrainedTokenizerFast``: byte-level BPE with ``vocab_size`` entries at most (256 bytes,
    3 special tokens, merges learnt from the corpus). Deterministic for a given vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    lines = _CORPUS.splitlines()
    tok.train_from_iterator(lines * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=4096)
    fast.chat_template = CHAT_TEMPLATE
    log.debug("tiny tokenizer: %d tokens", len(fast))
    return fast
