"""BEiT v2's vector quantizer: nearest code on the unit sphere, EMA codebook, k-means start, dead-code restarts.

Peng et al. 2022, "BEiT v2: Masked Image Modeling with Vector-Quantized Visual Tokenizers"; the VQ-KD
tokenizer (:mod:`mimkit.targets.vqkd`) quantizes each patch with it.

The EMA update is the classic one (van den Oord et al. 2017, appendix; Sonnet's ``VectorQuantizerEMA``):
cluster sizes ``N`` and embedding sums ``m`` are exponential moving averages, ``N`` is Laplace-smoothed and
each code becomes ``normalize(m_k / N_k)``. Because codes are re-normalized, the smoothing only guards the
division: a code's direction is that of its EMA sum. (BEiT v2's code instead moves each code towards the
normalized mean of its batch members; both keep codes on the unit sphere and are EMA k-means steps.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@dataclass
class QuantizerOutput:
    """What :class:`VectorQuantizer` returns.

    Attributes:
        quantized: (..., code_dim) the chosen codes with the straight-through gradient of the inputs.
        codes: (...) int64 indices of the chosen codes.
        loss: scalar commitment loss ``beta * mean((z - sg(q))**2)``.
    """

    quantized: Tensor
    codes: Tensor
    loss: Tensor


class VectorQuantizer(nn.Module):
    """Nearest-code quantization on the unit sphere with an EMA codebook (BEiT v2's quantizer).

    Inputs are expected l2-normalized (the tokenizer normalizes them); codes always are. The nearest code
    is the one of largest cosine similarity. In training mode each forward first (once) initializes the
    codebook with spherical k-means on its inputs when ``kmeans_init``, then updates it by EMA from the
    batch's assignments: counts and sums are computed without gradient and, when ``torch.distributed``
    is initialized, all-reduced over ranks so that every rank keeps the same codebook. Eval-mode
    forwards never change it. The codebook is a buffer, not a parameter: no optimizer touches it.

    Args:
        num_codes: codebook size K.
        code_dim: code width d.
        decay: EMA decay of cluster sizes and sums.
        eps: Laplace smoothing of the cluster sizes.
        beta: weight of the commitment loss.
        kmeans_init: initialize the codebook by k-means on the first training batch, else keep its
            random (normalized Gaussian) initialization.
        kmeans_iters: k-means iterations.
        dead_code_threshold: after each EMA step, codes whose EMA cluster size is below this many
            assignments per batch are restarted at random inputs of the batch (rank 0's under DDP), with
            that cluster size; 0 disables restarts.

    Attributes:
        codebook: (K, d) unit-norm codes.
        cluster_size: (K,) EMA of each code's assignment count.
        embed_sum: (K, d) EMA of the sum of each code's assigned inputs.
        initialized: bool scalar, True once the codebook has been initialized from data (or when no
            k-means initialization is wanted).
    """

    codebook: Tensor
    cluster_size: Tensor
    embed_sum: Tensor
    initialized: Tensor

    def __init__(
        self,
        num_codes: int,
        code_dim: int,
        decay: float = 0.99,
        eps: float = 1e-5,
        beta: float = 1.0,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 0.0,
    ) -> None:
        super().__init__()
        if num_codes < 2 or code_dim < 1:
            raise ValueError(f"need num_codes >= 2 and code_dim >= 1, got {num_codes} and {code_dim}")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1), got {decay}")
        self.num_codes = int(num_codes)
        self.code_dim = int(code_dim)
        self.decay = float(decay)
        self.eps = float(eps)
        self.beta = float(beta)
        self.kmeans_iters = int(kmeans_iters)
        self.dead_code_threshold = float(dead_code_threshold)
        codebook = F.normalize(torch.randn(num_codes, code_dim), dim=-1)
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.zeros(num_codes))
        self.register_buffer("embed_sum", codebook.clone())
        self.register_buffer("initialized", torch.tensor(not kmeans_init))

    def nearest(self, z: Tensor) -> Tensor:
        """Index of the code of largest cosine similarity: (..., d) -> (...) int64."""
        scores = z.float() @ self.codebook.t()  # (..., K); codes have unit norm, so this ranks cosines
        return scores.argmax(dim=-1)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize; in training mode, also update the codebook.

        Args:
            z: (..., code_dim) l2-normalized inputs.

        Returns:
            A :class:`QuantizerOutput`; ``quantized = z + (q - z).detach()`` so the gradient at the
            quantized output flows unchanged to ``z`` (straight-through).
        """
        if z.shape[-1] != self.code_dim:
            raise ValueError(f"inputs have width {z.shape[-1]}, the codebook {self.code_dim}")
        flat = z.reshape(-1, self.code_dim)  # (N, d)
        if self.training and not bool(self.initialized):
            self.kmeans_init_(flat)
        codes = self.nearest(flat)  # (N,)
        chosen = self.codebook[codes].to(flat.dtype)  # (N, d), a copy: the update below does not touch it
        if self.training:
            self.ema_update_(flat, codes)
            if self.dead_code_threshold > 0:
                self.restart_dead_codes_(flat)
        loss = self.beta * F.mse_loss(flat, chosen.detach())
        quantized = flat + (chosen - flat).detach()  # (N, d)
        return QuantizerOutput(quantized.view_as(z), codes.view(z.shape[:-1]), loss)

    @torch.no_grad()
    def kmeans_init_(self, z: Tensor) -> None:
        """Set the codebook to spherical k-means centroids of ``z`` (N, d) (rank 0's under DDP).

        Centroids start at distinct random inputs (sampled with replacement when N < K); empty clusters
        keep their centroid. The EMA state starts from the last assignment: cluster sizes are the cluster
        counts and sums the centroids times them (zero for empty clusters, which then keep their centroid
        or, with ``dead_code_threshold``, are restarted).
        """
        data = z.detach().float()  # (N, d)
        num = data.shape[0]
        if num >= self.num_codes:
            picks = torch.randperm(num, device=data.device)[: self.num_codes]
        else:
            picks = torch.randint(0, num, (self.num_codes,), device=data.device)
        centroids = F.normalize(data[picks], dim=-1)  # (K, d)
        counts = torch.zeros(self.num_codes, device=data.device)
        for _ in range(max(self.kmeans_iters, 1)):
            assign = (data @ centroids.t()).argmax(dim=-1)  # (N,)
            sums = torch.zeros_like(centroids).index_add_(0, assign, data)  # (K, d)
            counts = torch.bincount(assign, minlength=self.num_codes).float()  # (K,)
            centroids = torch.where((counts > 0)[:, None], F.normalize(sums, dim=-1), centroids)
        if _distributed():
            dist.broadcast(centroids, src=0)
            dist.broadcast(counts, src=0)
        self.codebook.copy_(centroids)
        self.embed_sum.copy_(centroids * counts[:, None])
        self.cluster_size.copy_(counts)
        self.initialized.fill_(True)

    @torch.no_grad()
    def ema_update_(self, z: Tensor, codes: Tensor) -> None:
        """One EMA step of the codebook from inputs ``z`` (N, d) assigned to ``codes`` (N,).

        ``N_k <- decay N_k + (1 - decay) n_k``, ``m_k <- decay m_k + (1 - decay) sum_{i: c_i = k} z_i``,
        ``code_k = normalize(m_k / N~_k)`` with the Laplace-smoothed ``N~_k = (N_k + eps) / (n + K eps) n``,
        ``n = sum_k N_k``. A code whose EMA sum has vanished keeps its direction.
        """
        data = z.detach().float()  # (N, d)
        counts = torch.bincount(codes, minlength=self.num_codes).float()  # (K,)
        sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, data)  # (K, d)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.num_codes * self.eps) * total  # (K,)
        means = self.embed_sum / smoothed.clamp_min(1e-30)[:, None]  # (K, d)
        norms = means.norm(dim=-1, keepdim=True)  # (K, 1)
        self.codebook.copy_(torch.where(norms > 1e-12, means / norms.clamp_min(1e-12), self.codebook))

    @torch.no_grad()
    def restart_dead_codes_(self, z: Tensor) -> int:
        """Move codes whose EMA cluster size is below ``dead_code_threshold`` to random inputs ``z`` (N, d)
        (distinct ones when N allows), giving them that cluster size; returns how many moved."""
        dead = (self.cluster_size < self.dead_code_threshold).nonzero().flatten()  # (n_dead,)
        num_dead = int(dead.numel())
        if num_dead == 0:
            return 0
        data = z.detach().float()  # (N, d)
        if data.shape[0] >= num_dead:
            picks = torch.randperm(data.shape[0], device=data.device)[:num_dead]
        else:
            picks = torch.randint(0, data.shape[0], (num_dead,), device=data.device)
        fresh = F.normalize(data[picks], dim=-1)  # (n_dead, d)
        if _distributed():  # every rank has the same dead codes (synced sizes); take rank 0's inputs
            dist.broadcast(fresh, src=0)
        self.codebook[dead] = fresh
        self.embed_sum[dead] = fresh * self.dead_code_threshold
        self.cluster_size[dead] = self.dead_code_threshold
        return num_dead
