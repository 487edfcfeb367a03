"""Tokenizers with a Llama-3-style and a Qwen2-style chat template, trained here (no downloads).

The templates render exactly as the models' own do for conversations that start with a system or user turn,
and mark each assistant answer with transformers' ``{% generation %}`` block: ``apply_chat_template(...,
return_assistant_tokens_mask=True)`` then gives the template's own account of which tokens are the
assistant's, the reference the chat_template prompt format is tested against.
"""

from __future__ import annotations

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [f"What colour is the {shape} on the {side}? It is {colour}. You are a helpful assistant."
          for shape in ("circle", "square", "triangle") for side in ("left", "right")
          for colour in ("red", "blue", "green")]


def chat_tokenizer(out_dir: str, style: str) -> str:
    """Train a byte-level BPE tokenizer, give it ``style``'s ('llama3' or 'qwen2') special tokens and chat
    template, save it to ``out_dir`` and return the folder (load it with memvp_ds.data.tokenizer)."""
    from memvp_ds.data.tokenizer import train_tokenizer

    if style == "llama3":  # BOS <|begin_of_text|>; an answer ends with <|eot_id|>, the instruct model's EOS
        tokenizer = train_tokenizer(CORPUS * 4, out_dir, vocab_size=300)
        tokenizer.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                      "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"]})
        tokenizer.chat_template = LLAMA3_TEMPLATE
    else:  # no BOS; an answer ends with <|im_end|>, the instruct model's EOS
        tokenizer = train_tokenizer(CORPUS * 4, out_dir, vocab_size=300, with_bos=False)
        tokenizer.add_special_tokens({"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>"]})
        tokenizer.chat_template = QWEN2_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return out_dir
