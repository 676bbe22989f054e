"""MILAN's prompting decoder: mask tokens attend to the visible tokens, which are never updated."""

from __future__ import annotations

import torch
from torch import Tensor

from mimkit.layers import run_block
from mimkit.masking import MaskSpec
from mimkit.models.mae_decoder import DecoderOutput, MAEDecoder
from mimkit.models.vit import EncoderOutput


class PromptingDecoder(MAEDecoder):
    """The prompting decoder of MILAN (Hou et al., "MILAN: Masked Image Pretraining on Language Assisted
    Representation", 2022).

    The embedded visible tokens (and the class token) are prompts: in every block the mask tokens attend
    to the prompts and to each other (queries from the mask tokens only, keys and values from all), and
    only the mask tokens are updated; the prompts leave the last block exactly as they entered the first.
    So the decoder can only complete the encoder's features, not rewrite them, and the encoder alone must
    carry the semantics. Same parameters, positions, norm and head as :class:`MAEDecoder`; its cost grows
    with the hidden patches as queries (``(L - Lk) x L`` attention instead of ``L x L``).

    Attention weights are not square here (mask-token queries only), so ``return_attn`` is refused;
    ``return_hidden`` gives each block's output in raster order, prompts included.
    """

    def forward(
        self,
        enc: EncoderOutput,
        mask: MaskSpec,
        *,
        return_attn: bool = False,
        return_hidden: bool = False,
    ) -> DecoderOutput:
        """Predict every patch: visible ones from their unchanged prompts, hidden ones from mask tokens."""
        if return_attn:
            raise ValueError(
                "the prompting decoder has no square attention map (only mask tokens query); analyses that need "
                "decoder attention, such as the exploitation rate, take an MAE decoder"
            )
        prefix, visible, mask_tokens = self.embed_tokens(enc, mask)
        num_prefix, num_visible = self.num_prefix_tokens, visible.shape[1]
        ids_shuffle = torch.argsort(mask.ids_restore, dim=1)  # (B, L): [kept, hidden] order
        patch_pos = self.pos_embed[:, num_prefix:].expand(ids_shuffle.shape[0], -1, -1)  # (B, L, Dd)
        patch_pos = torch.gather(patch_pos, 1, ids_shuffle.unsqueeze(-1).expand(-1, -1, patch_pos.shape[-1]))
        patches = torch.cat([visible, mask_tokens], dim=1) + patch_pos  # (B, L, Dd) in [kept, hidden] order
        x = torch.cat([prefix + self.pos_embed[:, :num_prefix], patches], dim=1)  # (B, P + L, Dd)
        out = DecoderOutput(pred=x)
        query_start = num_prefix + num_visible
        for block in self.blocks:
            x, _ = run_block(block, x, checkpoint=self.grad_checkpointing and self.training, query_start=query_start)
            if return_hidden:
                out.hidden_states.append(self._raster(x, mask))
        out.pred = self.pred(self.norm(self._raster(x, mask)))[:, num_prefix:]  # (B, L, out_dim)
        return out

    def _raster(self, x: Tensor, mask: MaskSpec) -> Tensor:
        """(B, P + L, Dd) with patches in [kept, hidden] order -> patches in raster order."""
        num_prefix = self.num_prefix_tokens
        index = mask.ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # (B, L, Dd)
        return torch.cat([x[:, :num_prefix], torch.gather(x[:, num_prefix:], 1, index)], dim=1)
