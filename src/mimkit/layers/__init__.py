"""Pure ``nn.Module`` building blocks (no config)."""

from mimkit.layers.block import (
    ATTENTION_IMPLS,
    Attention,
    Block,
    DropPath,
    Mlp,
    init_vit_weights,
    run_block,
    run_blocks,
    set_attention_impl,
)
from mimkit.layers.conv_block import ConvBlock, ConvMlp, ConvPatchEmbed, LayerNorm2d, masked, upsample_mask
from mimkit.layers.patch_embed import PatchEmbed, check_patch_grid, patchify, unpatchify
from mimkit.layers.pos_embed import resize_pos_embed, sincos_1d, sincos_2d
from mimkit.layers.quantizer import QuantizerOutput, VectorQuantizer

__all__ = [
    "ATTENTION_IMPLS",
    "Attention",
    "Block",
    "ConvBlock",
    "ConvMlp",
    "ConvPatchEmbed",
    "DropPath",
    "LayerNorm2d",
    "Mlp",
    "PatchEmbed",
    "QuantizerOutput",
    "VectorQuantizer",
    "check_patch_grid",
    "init_vit_weights",
    "masked",
    "patchify",
    "resize_pos_embed",
    "run_block",
    "run_blocks",
    "set_attention_impl",
    "sincos_1d",
    "sincos_2d",
    "unpatchify",
    "upsample_mask",
]
