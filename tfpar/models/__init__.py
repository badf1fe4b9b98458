"""Reference models: the GPT that `tfpar train` trains and the strategies are tested on."""

from tfpar.models.gpt import SIZES, GPTConfig, PositionEmbedding, TransformerBlock, config, gpt, lm_loss

__all__ = ["GPTConfig", "SIZES", "PositionEmbedding", "TransformerBlock", "config", "gpt", "lm_loss"]
