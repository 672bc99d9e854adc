"""Chat messages -> prompt token ids, through the tokenizer's chat template.

A checkpoint without a template gets DEFAULT_CHAT_TEMPLATE, ChatML (the format of
Qwen and of the bundled reference model), with the tokenizer's BOS token first
when it has one.  `lmc serve --chat-template FILE` replaces either.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from lmcompress.errors import LmcError

DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ChatRenderer:
    """Renders [{"role", "content"}] conversations into the token ids the model expects."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template_file: str | Path | None = None):
        self.tokenizer = tokenizer
        if template_file is not None:
            path = Path(template_file)
            if not path.is_file():
                raise LmcError(f"chat template {path} does not exist; pass a Jinja template file")
            self.template = path.read_text()
        else:
            self.template = tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text, ending with the assistant turn's opening."""
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template,
                                                      add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template raising on these messages is the caller's input
            raise LmcError(f"the chat template rejected these messages ({type(exc).__name__}: {exc}); "
                           "send the roles and content the model's template expects") from exc

    def token_ids(self, messages: list[dict[str, str]]) -> list[int]:
        # The template writes BOS and other special tokens itself; do not add them twice.
        return self.tokenizer(self.render(messages), add_special_tokens=False)["input_ids"]
