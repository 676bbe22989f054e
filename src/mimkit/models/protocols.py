"""The interfaces of the parts that :class:`~mimkit.models.mim.MaskedImageModel` assembles.

A pretraining model is ``MaskedImageModel(encoder, decoder, masker, target)``. Each part is any object with
the members of its Protocol below; a part that needs more from the frame or the training loop opts in by
implementing one of the capability Protocols (a guided masker asks the model for features or attention, a
stateful masker is told where training stands and keeps its state in the checkpoint). The frame and the
loop check these with ``isinstance`` and never probe for optional attributes.

::

    Masker           (batch, grid, *, generator, context) -> MaskSpec; .ratio
      GuidedMasker     + .guidance, .layer: what the model computes into ``context`` first
      StatefulMasker   + .advance(...), .observe_exploitation(...), .state_dict(), .load_state_dict()
      GridCheckedMasker + .check_grid(grid): refuses a patch grid it cannot mask, at build time
    Encoder          (images, mask, *, return_hidden, return_attn) -> EncoderOutput; .grid,
                     .num_prefix_tokens, .encoder_sees, .blocks, .forward_features(images, pool)
    Decoder          (EncoderOutput, MaskSpec, *, return_hidden, return_attn) -> DecoderOutput;
                     .num_prefix_tokens, .needs_hidden_states, .blocks
    Target           (images, pred, MaskSpec) -> scalar loss
      TeacherTarget    + .teacher: a frozen network whose saliency can guide masks
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from torch import Tensor, nn
from typing_extensions import get_protocol_members

from mimkit.masking.spec import Masker, MaskSpec

if TYPE_CHECKING:
    from mimkit.models.mae_decoder import DecoderOutput
    from mimkit.models.vit import EncoderOutput


@runtime_checkable
class GuidedMasker(Masker, Protocol):
    """A masker that looks at the model before it masks a batch.

    Attributes:
        guidance: what :meth:`~mimkit.models.mim.MaskedImageModel.guidance` must compute for the next batch
            (``"cls_attention"``, ``"teacher_attention"``, ``"encoder_features"``, ``"decoder_features"``), or
            None when this batch needs nothing (e.g. self-guided masking before its switch).
        layer: the block whose features are read (Python index), or None for the kind's default.
    """

    @property
    def guidance(self) -> str | None: ...

    @property
    def layer(self) -> int | None: ...


@runtime_checkable
class StatefulMasker(Masker, Protocol):
    """A masker whose masks change as training goes on, and whose state a resume must restore.

    The training loop calls :meth:`advance` once before every step, feeds :meth:`observe_exploitation` with
    the decoder's exploitation rate while :attr:`wants_exploitation` is True, and saves :meth:`state_dict`
    in every checkpoint.
    """

    @property
    def wants_exploitation(self) -> bool: ...

    def observe_exploitation(self, visible: float, mask: float, count: float = 1.0) -> None:
        """Add ``count`` measurements summing to ``visible`` (Rhat_{V->O}) and ``mask`` (Rhat_{M->O})."""

    def advance(self, *, step: int, total_steps: int, steps_per_epoch: int) -> bool:
        """Where training stands before ``step``; True when the masks change kind at this step."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class GridCheckedMasker(Masker, Protocol):
    """A masker that cannot mask every patch grid (e.g. grid masking needs even sides)."""

    def check_grid(self, grid: tuple[int, int]) -> None:
        """Raise ``ValueError`` naming the grid when it cannot be masked."""


@runtime_checkable
class Encoder(Protocol):
    """The backbone: the same module in pretraining (with a mask) and in evaluation (without one).

    Attributes:
        grid: (h, w) patches of the input images.
        num_prefix_tokens: class/prefix tokens before the patch tokens of its output.
        encoder_sees: ``"visible"`` (MAE: the output holds the visible patches only) or ``"all"`` (BEiT: every
            patch, hidden ones from the mask embedding).
        blocks: its transformer blocks, in order.
    """

    grid: tuple[int, int]
    num_prefix_tokens: int
    encoder_sees: str
    blocks: nn.ModuleList

    def __call__(
        self, images: Tensor, mask: MaskSpec | None = None, *, return_hidden: bool = False, return_attn: bool = False
    ) -> EncoderOutput: ...

    def forward_features(self, images: Tensor, pool: str = ...) -> Tensor: ...


@runtime_checkable
class Decoder(Protocol):
    """What predicts every patch's target from the encoder's output: MAE's decoder, MILAN's prompting
    decoder, an FC head, or one of those with BEiT v2's class-token head.

    Attributes:
        num_prefix_tokens: prefix tokens of its attention maps and hidden states before the patch tokens.
        needs_hidden_states: the encoder must return every block's output (``return_hidden=True``).
        blocks: its transformer blocks (empty for an FC head).
    """

    num_prefix_tokens: int
    needs_hidden_states: bool
    blocks: nn.ModuleList

    def __call__(
        self, enc: EncoderOutput, mask: MaskSpec, *, return_hidden: bool = False, return_attn: bool = False
    ) -> DecoderOutput: ...


@runtime_checkable
class Target(Protocol):
    """What is predicted and how it is scored: pixels, HOG, teacher features or tokenizer codes."""

    def __call__(self, images: Tensor, pred: Tensor, mask: MaskSpec) -> Tensor:
        """The scalar loss of ``pred`` (B, L, D_out) on the patches ``mask`` scores."""


@runtime_checkable
class TeacherTarget(Target, Protocol):
    """A target computed by a frozen teacher network, whose saliency can also guide masks (MILAN)."""

    teacher: nn.Module


def check_part(part: object, protocol: type, role: str) -> None:
    """Raise ``TypeError`` naming what ``part`` lacks when it does not implement ``protocol``."""
    if isinstance(part, protocol):
        return
    members = sorted(get_protocol_members(protocol))
    missing = [name for name in members if not hasattr(part, name)]
    raise TypeError(
        f"{role} {type(part).__name__} does not implement {protocol.__name__}"
        + (f": it has no {', '.join(missing)}" if missing else "")
    )


__all__ = [
    "Decoder",
    "Encoder",
    "GridCheckedMasker",
    "GuidedMasker",
    "Masker",
    "StatefulMasker",
    "Target",
    "TeacherTarget",
    "check_part",
]
