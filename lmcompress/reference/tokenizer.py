"""Byte-level BPE tokenizers for the reference model and for random test checkpoints.

Both are saved as a transformers fast tokenizer (tokenizer.json +
tokenizer_config.json with a ChatML chat template), so
`AutoTokenizer.from_pretrained(dir)` and `apply_chat_template` work on them.
Like Llama's, the tokenizer puts <s> before every encoded text; the chat
template writes <s> itself (apply_chat_template does not add special tokens).

    python -m lmcompress.reference.tokenizer --train corpus/train.txt --out tok/
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, IM_START, IM_END = "<s>", "</s>", "<|im_start|>", "<|im_end|>"
# Ids 0..3, in this order.  Byte-level BPE can spell any text, so there is no <unk>.
SPECIAL_TOKENS = (BOS, EOS, IM_START, IM_END)
REFERENCE_VOCAB_SIZE = 8192

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _byte_level_tokenizer(model: models.BPE) -> Tokenizer:
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _as_transformers(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """Add Llama's "<s> text" post-processing and wrap for transformers."""
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def train_tokenizer(files: list[str | Path], vocab_size: int = REFERENCE_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Byte-level BPE learned on text files (one vocabulary entry per byte, then merges)."""
    tokenizer = _byte_level_tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(f) for f in files], trainer)
    return _as_transformers(tokenizer)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """The smallest working tokenizer: the 4 special tokens, then the 256 bytes, no merges."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    tokenizer = _byte_level_tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return _as_transformers(tokenizer)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, nargs="+", required=True, help="text files to learn merges from")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vocab-size", type=int, default=REFERENCE_VOCAB_SIZE)
    args = parser.parse_args(argv)
    train_tokenizer(args.train, args.vocab_size).save_pretrained(args.out)
    print(f"tokenizer saved to {args.out}")


if __name__ == "__main__":
    main()
