"""A tiny byte-level BPE tokenizer trained in code (offline) for tests and tiny policies.

It has SmolLM2's first special tokens (``<|endoftext|>`` 0, ``<|im_start|>`` 1, ``<|im_end|>`` 2 = pad)
and SmolVLM's image tokens appended after the learned vocabulary, so that a 304-token vocabulary is
produced for the default corpus (the tiny architecture's ``vocab_size``).
"""
from __future__ import annotations

from typing import Any

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
IMAGE_TOKENS = ["<global-img>", "<fake_token_around_image>", "<image>", "<end_of_utterance>"]
CORPUS = [
    "pick up the red cube and place it in the box", "open the drawer", "close the drawer",
    "push the green block to the left", "stack the blue cube on the yellow cube",
    "grasp the cup", "put the sponge in the bowl", "move the arm up", "insert the peg",
]


def build_tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 300) -> Any:
    """A ``PreTrainedTokenizerFast`` (BPE trained on ``corpus``) + the special/image tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((corpus or CORPUS) * 20, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in IMAGE_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
        pad_token="<|im_end|>", unk_token="<|endoftext|>", model_max_length=8192,
        extra_special_tokens={"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
                              "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"},
    )
