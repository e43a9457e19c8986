"""Small test bases: a real architecture from a config, seeded random weights, and a byte-level
tokenizer with a ChatML template, so tests need no download and no conversion."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

TEST_CONFIGS: dict[str, dict[str, object]] = {
    "llama": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
}


def build_byte_tokenizer(out: Path) -> int:
    """Write a byte-level tokenizer (256 byte tokens + ChatML specials); return its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: index for index, token in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return len(tokenizer)


def build_test_base(kind: str, seed: int, out: Path) -> None:
    """Save a seeded random model of architecture `kind` with its tokenizer into `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if kind not in TEST_CONFIGS:
        raise ValueError(f"unknown test base kind {kind!r}; known: {sorted(TEST_CONFIGS)}")
    vocab_size = build_byte_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    settings = dict(TEST_CONFIGS[kind])
    model_type = str(settings.pop("model_type"))
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **settings,
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # Random init leaves tiny logits; widen them so sampling tests see real choices.
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, 1.0)
    finally:
        torch.random.set_rng_state(generator_state)
    model.save_pretrained(out)
