"""Maskers guided by the model: attention-guided (AttMask / MILAN) and Self-Guided MAE's informed masking.

A guided masker says through its ``guidance`` attribute what it needs from the model for the next
batch (``None``: nothing, it masks at random; ``"cls_attention"``: the class token's attention over the
patches; ``"decoder_features"`` / ``"encoder_features"``: patch features of one layer), and
:class:`~mimkit.models.mim.MaskedImageModel` computes that, without gradients, into ``context``. The
training loop tells a stateful masker where training stands through ``update(...)`` and saves its
``state_dict()``; it never needs to know which masker it runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mimkit.masking.ncut import FOREGROUND_RULES, choose_foreground, ncut_split, patch_affinity, similarity_to_mean
from mimkit.masking.random import RandomMasker
from mimkit.masking.spec import MaskSpec, OptionError, num_hidden_patches

ATTENTION_MODES = ("hide", "keep")
TRIGGERS = ("exploitation", "epoch")
SETTINGS = ("practical", "ideal")
GRAPHS = ("weighted", "binary")
HINT_CHOICES = ("random", "similarity")


def _context_tensor(context: Any, key: str, batch: int, masker: str) -> Tensor:
    value = context.get(key) if isinstance(context, dict) else None
    if not isinstance(value, Tensor):
        raise ValueError(
            f"{masker} needs context[{key!r}] computed by the model; call MaskedImageModel.make_mask(batch, "
            "images=images) rather than the masker directly"
        )
    if value.shape[0] != batch:
        raise ValueError(f"context[{key!r}] holds {value.shape[0]} images, the batch has {batch}")
    return value


def gumbel_top_k(scores: Tensor, k: int, temperature: float, generator: torch.Generator | None) -> Tensor:
    """(B, L) bool marking, per row, ``k`` entries sampled without replacement with probabilities
    proportional to ``softmax(scores / temperature)`` (the Gumbel top-k trick); ``temperature -> 0``
    takes the ``k`` largest scores, a large temperature approaches uniform sampling."""
    uniform = torch.rand(scores.shape, generator=generator).to(scores.device).clamp_(1e-9, 1 - 1e-9)  # (B, L)
    gumbel = -torch.log(-torch.log(uniform))
    keys = scores.float() / max(temperature, 1e-6) + gumbel  # (B, L)
    chosen = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return chosen.scatter_(1, keys.topk(k, dim=1).indices, True)  # (B, L)


class AttentionMasker:
    """Attention-guided masking (AttMask, Kakogeorgiou et al. 2022; MILAN, Hou et al. 2022).

    The class token's attention over the patches (last encoder block, all patches visible, averaged
    over heads) ranks the patches; ``round(ratio * L)`` are hidden, sampled without replacement with
    probability ``softmax(log(attention) / temperature)``. ``mode="hide"`` hides the most-attended
    patches (AttMask-High: a harder task), ``mode="keep"`` keeps them visible (MILAN: the encoder sees
    what matters).

    Args:
        ratio: fraction of patches hidden.
        mode: ``"hide"`` or ``"keep"`` the most-attended patches.
        temperature: 0 is deterministic top-k; larger values mix in randomness (1: proportional to the
            attention itself).
        source: ``"encoder"`` (the model being trained, without gradients) or ``"teacher"``.
    """

    def __init__(
        self, ratio: float = 0.75, mode: str = "hide", temperature: float = 1.0, source: str = "encoder"
    ) -> None:
        num_hidden_patches(1, ratio)
        if mode not in ATTENTION_MODES:
            raise OptionError("mode", f"attention masking mode must be one of {ATTENTION_MODES}, got {mode!r}")
        if temperature < 0:
            raise OptionError("temperature", f"temperature must be >= 0, got {temperature}")
        if source not in ("encoder", "teacher"):
            raise OptionError("source", f"attention source must be 'encoder' or 'teacher', got {source!r}")
        self.ratio, self.mode, self.temperature, self.source = ratio, mode, temperature, source
        self.guidance = "cls_attention" if source == "encoder" else "teacher_attention"
        self.layer: int | None = None  # the class token's attention is read in the last encoder block

    def __call__(
        self,
        batch: int,
        grid: tuple[int, int],
        *,
        generator: torch.Generator | None = None,
        context: Any = None,
    ) -> MaskSpec:
        attention = _context_tensor(context, self.guidance, batch, "attention masking")  # (B, L)
        num_patches = grid[0] * grid[1]
        if attention.shape[1] != num_patches:
            raise ValueError(f"attention covers {attention.shape[1]} patches, the grid has {num_patches}")
        num_hidden = num_hidden_patches(num_patches, self.ratio)
        scores = attention.clamp_min(1e-12).log()  # (B, L)
        if self.mode == "hide":
            mask = gumbel_top_k(scores, num_hidden, self.temperature, generator)
        else:
            mask = ~gumbel_top_k(scores, num_patches - num_hidden, self.temperature, generator)
        return MaskSpec.from_mask(mask)

    def __repr__(self) -> str:
        return (
            f"AttentionMasker(ratio={self.ratio}, mode={self.mode!r}, temperature={self.temperature}, "
            f"source={self.source!r})"
        )


def informed_mask(
    foreground: Tensor,
    num_hidden: int,
    num_hints: Tensor | int,
    generator: torch.Generator | None = None,
    scores: Tensor | None = None,
) -> Tensor:
    """Self-Guided MAE's informed mask from a foreground cluster.

    Per image: ``num_hints`` foreground patches stay visible as hints, the other foreground patches are
    hidden first, and any remaining budget hides random background patches; exactly ``num_hidden``
    patches are hidden. Without ``scores`` the hints and the hiding order inside the foreground are
    random; with ``scores`` the foreground is ranked by them: the highest-scored patches are hidden first
    and the lowest-scored become the hints.

    Args:
        foreground: (B, L) bool, the cluster to hide.
        num_hidden: patches hidden per image.
        num_hints: hints per image, an int or (B,) ints (at most the foreground size).
        generator: source of the random choices.
        scores: optional (B, L) ranking of the foreground patches (higher: hidden first).

    Returns:
        (B, L) bool mask, True = hidden.
    """
    batch, length = foreground.shape
    if not 0 <= num_hidden <= length:
        raise ValueError(f"num_hidden must lie in [0, {length}], got {num_hidden}")
    noise = torch.rand(batch, length, generator=generator).to(foreground.device)  # (B, L) in [0, 1)
    order = noise
    if scores is not None:
        if scores.shape != foreground.shape:
            raise ValueError(f"scores must be {tuple(foreground.shape)}, got {tuple(scores.shape)}")
        order = torch.argsort(torch.argsort(scores.float(), dim=1), dim=1).float() / length  # (B, L) in [0, 1)
    hints = torch.as_tensor(num_hints, device=foreground.device).expand(batch)  # (B,)
    # The first num_hints foreground patches in ascending order are the hints.
    fg_rank = torch.argsort(torch.argsort(torch.where(foreground, order, 2.0), dim=1), dim=1)  # (B, L)
    is_hint = foreground & (fg_rank < hints[:, None])  # (B, L)
    inside = torch.where(foreground, order, noise)  # (B, L)
    priority = inside + 2.0 * (foreground & ~is_hint).float() - 2.0 * is_hint.float()  # hidden first: high
    mask = torch.zeros(batch, length, dtype=torch.bool, device=foreground.device)
    return mask.scatter_(1, priority.topk(num_hidden, dim=1).indices, True)


class SelfGuidedMasker:
    """Self-Guided MAE's masker (Shin et al., NeurIPS 2024): random masks until the model has learned to
    cluster patches, then informed masks from its own patch clustering, in the same run.

    Before the switch it is MAE's random masker. With ``trigger="exploitation"`` the training loop
    measures the decoder's exploitation rate (:mod:`mimkit.masking.exploitation`) while
    :attr:`wants_exploitation` is True and hands each measurement to :meth:`observe_exploitation`; the masker
    keeps them in its own window and, at each check (every ``trigger_every_steps`` steps, else at every
    epoch start; :meth:`advance`), passes their mean ``(Rhat_{V->O}, Rhat_{M->O})`` to :meth:`update`. The
    switch fires where the paper's curves cross: ``Rhat_{M->O}`` above ``Rhat_{V->O}`` for
    ``trigger_patience`` consecutive checks, after having been at or below it at an earlier check (a curve
    that starts above does not fire until it has dipped), and not before ``start_epoch`` when given.
    ``trigger="epoch"`` switches at a fixed ``start_epoch`` instead. Every check is kept in :attr:`curve`,
    which the checkpoint holds.

    After the switch every batch is bipartitioned by a normalized cut of one layer's patch features
    (``guidance``: decoder features of a random-masked forward pass, the practical setting, or encoder
    features on all patches, the ideal one) on the article's fully connected cosine-similarity graph
    (``graph="weighted"``) or TokenCut's binarised one (``"binary"``). The object side
    (``foreground``, see :func:`~mimkit.masking.ncut.choose_foreground`) is hidden first, a ratio of it
    stays visible as hint tokens, and random patches fill the rest of the budget (:func:`informed_mask`).
    ``hint_choice="random"`` picks hints and hiding order at random; ``"similarity"`` ranks the object
    patches by their cosine similarity to the mean patch: the least similar (most object-like) are hidden
    first, the most similar become the hints.

    The hint ratio falls linearly from ``hint_ratio`` at the switch to ``hint_ratio_end`` at the end of
    training (mimkit's schedule; the article does not give one), a pure function of (step, switch step,
    total steps), so a resume continues it exactly.

    Args:
        ratio: fraction of patches hidden.
        hint_ratio: fraction of the foreground cluster revealed as hints right after the switch.
        hint_ratio_end: the fraction at the end of training.
        trigger: ``"exploitation"`` or ``"epoch"``.
        trigger_patience: consecutive checks with mask tokens exploited more that the switch needs.
        start_epoch: the switch epoch with ``trigger="epoch"`` (fractional values switch mid-epoch, at the
            first step past it); with ``"exploitation"``, an optional earliest epoch.
        layer: which block's output features are clustered (Python index, -1 = last); None takes the middle
            block, ``depth // 2 - 1``.
        setting: ``"ideal"`` (encoder on all patches, the default) or ``"practical"`` (decoder features after a
            random-masked pass). On Fashion-MNIST the practical cut of every decoder block separates the
            pass's visible tokens from its mask tokens (IoU 0.21 with the object after 3 epochs), while every
            encoder block from 0 to 11 cuts object from background (IoU 0.82 with the border rule).
        graph: ``"weighted"`` or ``"binary"`` Ncut graph.
        foreground: ``"border"``, ``"mean"`` or ``"eigenvector"`` object-side rule.
        tau: similarity threshold of the binary graph.
        hint_choice: ``"random"`` or ``"similarity"``.
        trigger_every_steps: steps between the trigger's checks; None checks at every epoch start.
    """

    def __init__(
        self,
        ratio: float = 0.75,
        hint_ratio: float = 0.1,
        hint_ratio_end: float = 0.0,
        trigger: str = "exploitation",
        trigger_patience: int = 1,
        start_epoch: float | None = None,
        layer: int | None = None,
        setting: str = "ideal",
        graph: str = "weighted",
        foreground: str = "border",
        tau: float = 0.2,
        hint_choice: str = "random",
        trigger_every_steps: int | None = None,
    ) -> None:
        num_hidden_patches(1, ratio)
        if not 0 <= hint_ratio_end <= hint_ratio < 1:
            raise OptionError(
                "hint_ratio" if not 0 <= hint_ratio < 1 else "hint_ratio_end",
                f"need 0 <= hint_ratio_end <= hint_ratio < 1, got {hint_ratio_end} and {hint_ratio}",
            )
        if trigger not in TRIGGERS:
            raise OptionError("trigger", f"trigger must be one of {TRIGGERS}, got {trigger!r}")
        if trigger_every_steps is not None and trigger_every_steps < 1:
            message = f"trigger_every_steps must be >= 1 (or None), got {trigger_every_steps}"
            raise OptionError("trigger_every_steps", message)
        if trigger_patience < 1:
            raise OptionError("trigger_patience", f"trigger_patience must be >= 1, got {trigger_patience}")
        if trigger == "epoch" and start_epoch is None:
            raise OptionError("start_epoch", "trigger 'epoch' needs start_epoch")
        if start_epoch is not None and start_epoch < 0:
            raise OptionError("start_epoch", f"start_epoch must be >= 0, got {start_epoch}")
        if setting not in SETTINGS:
            raise OptionError("setting", f"setting must be one of {SETTINGS}, got {setting!r}")
        if graph not in GRAPHS:
            raise OptionError("graph", f"graph must be one of {GRAPHS}, got {graph!r}")
        if foreground not in FOREGROUND_RULES:
            raise OptionError("foreground", f"foreground must be one of {FOREGROUND_RULES}, got {foreground!r}")
        if hint_choice not in HINT_CHOICES:
            raise OptionError("hint_choice", f"hint_choice must be one of {HINT_CHOICES}, got {hint_choice!r}")
        self.ratio, self.hint_ratio, self.hint_ratio_end = ratio, hint_ratio, hint_ratio_end
        self.trigger, self.trigger_patience, self.start_epoch = trigger, trigger_patience, start_epoch
        self.layer, self.setting, self.graph, self.foreground = layer, setting, graph, foreground
        self.tau, self.hint_choice, self.trigger_every_steps = tau, hint_choice, trigger_every_steps
        self.random = RandomMasker(ratio)
        self.switch_step: int | None = None
        self.seen_below = False  # a check had mask tokens exploited no more than visible ones
        self.streak = 0  # consecutive checks since then with mask tokens exploited more
        self.curve: list[list[float]] = []  # every check: [step, epoch, Rhat_{V->O}, Rhat_{M->O}]
        self.step, self.total_steps = 0, 1
        self.window = [0.0, 0.0, 0.0]  # exploitation measured since the last check: (visible sum, mask sum, count)

    @property
    def informed(self) -> bool:
        """Whether informed masking has started."""
        return self.switch_step is not None

    @property
    def guidance(self) -> str | None:
        """What the model must compute for the next batch: nothing before the switch."""
        if not self.informed:
            return None
        return "decoder_features" if self.setting == "practical" else "encoder_features"

    @property
    def wants_exploitation(self) -> bool:
        """The training loop measures the exploitation rate while the trigger waits for it."""
        return not self.informed and self.trigger == "exploitation"

    def observe_exploitation(self, visible: float, mask: float, count: float = 1.0) -> None:
        """Add ``count`` measurements of the exploitation rate summing to ``visible`` and ``mask`` to the
        window the next check averages (several ranks' measurements arrive summed)."""
        self.window = [self.window[0] + visible, self.window[1] + mask, self.window[2] + count]

    def advance(self, *, step: int, total_steps: int, steps_per_epoch: int) -> bool:
        """Called before every training step: at a check point, :meth:`update` with the window's mean (then
        emptied), else with nothing measured; returns True when informed masking starts at this step."""
        every = self.trigger_every_steps or steps_per_epoch
        exploitation = None
        if step > 0 and step % every == 0:
            visible_sum, mask_sum, count = self.window
            if count:
                exploitation = (visible_sum / count, mask_sum / count)
            self.window = [0.0, 0.0, 0.0]
        return self.update(step=step, total_steps=total_steps, epoch=step / steps_per_epoch, exploitation=exploitation)

    def current_hint_ratio(self) -> float:
        """The hint ratio at the current step (``hint_ratio`` at the switch, linear to ``hint_ratio_end``)."""
        if self.switch_step is None:
            return self.hint_ratio
        span = max(1, self.total_steps - self.switch_step)
        progress = min(1.0, max(0.0, (self.step - self.switch_step) / span))
        return self.hint_ratio + (self.hint_ratio_end - self.hint_ratio) * progress

    def update(
        self, *, step: int, total_steps: int, epoch: float, exploitation: tuple[float, float] | None = None
    ) -> bool:
        """Tell the masker where training stands; returns True when informed masking starts now.

        Args:
            step: optimizer steps done.
            total_steps: steps of the whole run.
            epoch: epochs done (fractional).
            exploitation: ``(Rhat_{V->O}, Rhat_{M->O})`` measured since the last check, or None when this is
                no check (nothing measured).
        """
        self.step, self.total_steps = step, max(1, total_steps)
        if self.informed:
            return False
        early = self.start_epoch is not None and epoch < self.start_epoch
        if self.trigger == "epoch":
            fire = not early
        elif exploitation is None:
            fire = False
        else:
            visible, mask = exploitation
            self.curve.append([float(step), float(epoch), float(visible), float(mask)])
            if mask > visible:
                self.streak += int(self.seen_below)
            else:
                self.seen_below, self.streak = True, 0
            fire = self.streak >= self.trigger_patience and not early
        if fire:
            self.switch_step = step
        return fire

    def __call__(
        self,
        batch: int,
        grid: tuple[int, int],
        *,
        generator: torch.Generator | None = None,
        context: Any = None,
    ) -> MaskSpec:
        if not self.informed:
            return self.random(batch, grid, generator=generator)
        features = _context_tensor(context, str(self.guidance), batch, "self-guided masking").float()  # (B, L, D)
        num_patches = grid[0] * grid[1]
        affinity = patch_affinity(features, tau=self.tau, binarize=self.graph == "binary")  # (B, L, L)
        partition, eigenvector = ncut_split(affinity)  # (B, L) bool, (B, L)
        foreground = choose_foreground(
            partition,
            grid,
            how=self.foreground,  # type: ignore[arg-type]
            features=features,
            eigenvector=eigenvector,
        )  # (B, L)
        scores = -similarity_to_mean(features) if self.hint_choice == "similarity" else None  # (B, L)
        num_hints = torch.round(foreground.sum(dim=1) * self.current_hint_ratio()).long()  # (B,)
        num_hidden = num_hidden_patches(num_patches, self.ratio)
        return MaskSpec.from_mask(informed_mask(foreground, num_hidden, num_hints, generator, scores=scores))

    def state_dict(self) -> dict[str, Any]:
        """The switch, the trigger's curve and its window, for a checkpoint (the hint schedule follows from the
        switch)."""
        return {
            "switch_step": self.switch_step,
            "seen_below": self.seen_below,
            "streak": self.streak,
            "curve": [list(point) for point in self.curve],
            "window": list(self.window),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        switch = state.get("switch_step")
        self.switch_step = None if switch is None else int(switch)
        self.seen_below = bool(state.get("seen_below", False))
        self.streak = int(state.get("streak", 0))
        self.curve = [[float(value) for value in point] for point in state.get("curve", [])]
        self.window = [float(value) for value in state.get("window", (0.0, 0.0, 0.0))]

    def __repr__(self) -> str:
        return (
            f"SelfGuidedMasker(ratio={self.ratio}, hint_ratio={self.hint_ratio}->{self.hint_ratio_end}, "
            f"trigger={self.trigger!r}, trigger_patience={self.trigger_patience}, start_epoch={self.start_epoch}, "
            f"layer={self.layer}, setting={self.setting!r}, graph={self.graph!r}, foreground={self.foreground!r}, "
            f"hint_choice={self.hint_choice!r}, switch_step={self.switch_step})"
        )
