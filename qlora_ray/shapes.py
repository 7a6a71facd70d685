"""Named model shapes for `shape:NAME` bases: random-weight Llama models built from a config.

They exercise the pipeline without downloading anything: `tiny` for unit tests (builds in
milliseconds), `smollm2-135m` for CPU runs at a real size, `llama3-1b` and `llama3-8b` for GPU speed tests (build
it on the GPU: random weights say nothing about quality, only about speed and memory).

Their tokenizer is a byte-level BPE with no merges (one token per byte plus the ChatML specials),
built in code, so shape models need no tokenizer files either.
"""

from __future__ import annotations

from transformers import LlamaConfig, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BYTE_VOCAB = 256 + len(SPECIAL_TOKENS)

SHAPES: dict[str, dict] = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=BYTE_VOCAB, max_position_embeddings=1024, tie_word_embeddings=False,
        # With the usual 0.02, a 64-wide random lm_head cannot produce logits far from uniform, so
        # no adapter could bring the loss much under ln(vocab); 0.2 leaves room to learn.
        initializer_range=0.2,
    ),
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
    ),
    "llama3-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=True,
    ),
    "llama3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
    ),
}


def shape_config(name: str) -> LlamaConfig:
    if name not in SHAPES:
        raise KeyError(name)
    tokenizer_ids = {"bos_token_id": None, "eos_token_id": 258, "pad_token_id": 256}
    return LlamaConfig(**SHAPES[name], **tokenizer_ids, rms_norm_eps=1e-5)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A real, offline tokenizer: one token per byte, ChatML specials, eos = <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)  # ids 256, 257, 258
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )
