"""GPT-2 model configuration, with llm.c's fields and the usual presets."""

from __future__ import annotations

from dataclasses import dataclass, replace

from llmpy.core.errors import OptionError

GPT2_VOCAB_SIZE = 50257
GPT2_EOT_TOKEN = 50256


def end_of_text_token(vocab_size: int) -> int:
    """<|endoftext|> for GPT-2's vocabulary; the last id of any other (where generation starts, as llm.c's)."""
    return GPT2_EOT_TOKEN if vocab_size == GPT2_VOCAB_SIZE else vocab_size - 1


def pad_vocab(vocab_size: int, multiple: int = 128) -> int:
    """Vocabulary size rounded up to a multiple of `multiple` (llm.c pads 50257 to 50304)."""
    return ((vocab_size + multiple - 1) // multiple) * multiple


@dataclass(frozen=True)
class GPT2Config:
    """The six integers of llm.c's GPT2Config.

    max_seq_len: longest sequence (maxT); vocab_size: real vocabulary (V);
    padded_vocab_size: V rounded up to a multiple of 128 (Vp); num_layers (L); num_heads (NH);
    channels (C).
    """

    max_seq_len: int = 1024
    vocab_size: int = GPT2_VOCAB_SIZE
    padded_vocab_size: int = pad_vocab(GPT2_VOCAB_SIZE)
    num_layers: int = 12
    num_heads: int = 12
    channels: int = 768

    def __post_init__(self) -> None:
        for name in ("max_seq_len", "vocab_size", "padded_vocab_size", "num_layers", "num_heads", "channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPT2Config.{name} must be a positive integer, got {value!r}")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(
                f"GPT2Config.padded_vocab_size ({self.padded_vocab_size}) is smaller than vocab_size ({self.vocab_size})"
            )
        if self.channels % self.num_heads != 0:
            raise ValueError(
                f"GPT2Config.channels ({self.channels}) is not divisible by num_heads ({self.num_heads})"
            )

    @property
    def head_size(self) -> int:
        return self.channels // self.num_heads

    def with_vocab(self, vocab_size: int) -> "GPT2Config":
        return replace(self, vocab_size=vocab_size, padded_vocab_size=pad_vocab(vocab_size))

    def num_parameters(self) -> int:
        """Floats in llm.c's 16 parameter tensors (llmpy.core.layout): wte, wpe, 12C^2 + 13C per layer, lnf."""
        C, L = self.channels, self.num_layers
        return self.padded_vocab_size * C + self.max_seq_len * C + L * (12 * C * C + 13 * C) + 2 * C

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token by llm.c's count: 6N + 6*L*C*T (forward + backward)."""
        return 6 * self.num_parameters() + 6 * self.num_layers * self.channels * seq_len


ATTENTION_KINDS = ("flash", "llmc")
RECOMPUTE_LEVELS = (0, 1, 2)
# token rows per classifier chunk in training; 0: the whole batch, one chunk (the fastest: chunks of 256 rows made
# d12's step 8-22% slower at 4x256 and 1x1024, bench/README.md; a (256, Vp) chunk is 51 MB against B*T*Vp*4 bytes)
CLASSIFIER_ROWS = 0


@dataclass(frozen=True)
class ActivationOptions:
    """How a step computes attention and what it keeps for backward (llmpy.core.layout).

    attention: "flash" (tiled, stores each row's log-sum-exp) or "llmc" (llm.c's stored (T, T) scores);
    recompute: 0 keeps everything, 1 recomputes GELU outputs in backward, 2 also the layernorm outputs;
    classifier_rows: token rows per chunk of the training classifier (lm_head, cross-entropy and their gradients
    on one buffer of that many rows, llmpy.core.layout.classifier_chunks); backward recomputes the logits of every
    chunk but the last, so 0 (the default) or at least B*T rows (one chunk) keeps all the logits and recomputes
    none."""

    attention: str = "flash"
    recompute: int = 0
    classifier_rows: int = CLASSIFIER_ROWS

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise OptionError("attention", self.attention,
                              f"is not an attention kernel; choose one of {', '.join(ATTENTION_KINDS)}")
        if self.recompute not in RECOMPUTE_LEVELS:
            raise OptionError("recompute", self.recompute, "must be 0 (keep all), 1 (recompute GELU) or 2 "
                                                          "(GELU and layernorm)")
        if not isinstance(self.classifier_rows, int) or self.classifier_rows < 0:
            raise OptionError("classifier_rows", self.classifier_rows,
                              "must be a number of token rows >= 1, or 0 for the whole batch")


def _gpt2(layers: int, heads: int, channels: int) -> GPT2Config:
    return GPT2Config(num_layers=layers, num_heads=heads, channels=channels)


PRESETS: dict[str, GPT2Config] = {
    "d12": _gpt2(12, 12, 768),  # GPT-2 124M
    "d24": _gpt2(24, 16, 1024),  # GPT-2 350M
    "d36": _gpt2(36, 20, 1280),  # GPT-2 774M
    "d48": _gpt2(48, 25, 1600),  # GPT-2 1558M
    # Small configs for tests and quick experiments; same GPT-2 vocabulary unless noted.
    "d2": _gpt2(2, 2, 64),
    "d4": _gpt2(4, 4, 128),
    "tiny": GPT2Config(max_seq_len=32, vocab_size=97, padded_vocab_size=128, num_layers=2, num_heads=2, channels=32),
}


def preset(name: str) -> GPT2Config:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}") from None
