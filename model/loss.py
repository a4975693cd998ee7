"""Image-text matching loss of VSRN (Eq. 8 of the ICCV 2019 paper), with hardest negatives.

The reference (KunpengLi1994/VSRN ``model.py``, forked from VSE++ ``ContrastiveLoss``) computes,
for a batch whose row ``i`` of the image embeddings and row ``i`` of the caption embeddings form a
positive pair, the cosine similarities ``S = im @ s.T`` (the embeddings are l2-normalised) and

    cost_s[i, j]  = max(0, margin + S[i, j] - S[i, i])   image i as query, caption j a negative
    cost_im[i, j] = max(0, margin + S[i, j] - S[j, j])   caption j as query, image i a negative

with the positive pairs masked out. With ``max_violation`` only the hardest negative of every query
counts (``cost_s.max(1)``, ``cost_im.max(0)``); without it every negative counts (used here for a
warm-up before switching to hardest negatives). The result is SUMMED over the batch, not averaged,
so its scale grows with the batch; the learning rate of the reference is tuned to that.

Two extensions over the reference:

* ``image_ids``: a batch may hold several captions of the same image, each in its own row (their
  image rows are the same image). Such pairs are true matches, so they are never used as
  negatives. Without ids only the diagonal is masked, exactly as the reference does.
* A distributed version. Every worker gathers the embeddings (with gradient) and the image ids of
  all workers, keeps its OWN rows as anchors and mines the hardest negative among ALL candidates of
  the global batch. The loss of a rank is the sum over its local anchors only, so the sum of the
  ranks' losses equals the single-process loss of the concatenated batch, and after the 1/W
  averaging of parameter gradients that data parallelism (DDP, DeepSpeed) applies, the gradients
  equal the single-process gradients divided by W. Computing the GLOBAL loss on every rank with an
  autograd gather would instead count every term W times (open_clip issue #616).

Both paths run the same core (:func:`_anchor_candidate_loss`: local anchors x global candidates),
so there is one implementation of the hinge.

Diagnostics (``with_stats=True``): the same call also returns :class:`HardNegativeStats`, computed
under ``torch.no_grad()`` from the score matrices the loss already holds (no extra matrix product):
per anchor the gap between its positive score and its hardest negative's score in each direction,
how many of the hinge terms the loss sums are active, and how many hardest negatives lie in another
rank's part of the gathered candidates. They tell a healthy run from one collapsing to the trivial
solution (every embedding alike, every gap 0, L_M at 2 * B * margin under hardest negatives). The
loss value and its gradients are the same with or without them.

This module is library code: it imports nothing from the rest of the project.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, overload

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import Tensor, nn

__all__ = [
    "DEFAULT_MARGIN",
    "HardNegativeStats",
    "HardestNegativeLoss",
    "gather_with_grad",
    "gathered_hardest_negative_loss",
    "hardest_negative_loss",
]

#: Margin of the reference (``--margin 0.2``).
DEFAULT_MARGIN: float = 0.2


@dataclass(frozen=True)
class HardNegativeStats:
    """Diagnostics of one loss call over its ``b`` local anchors; detached, on the loss's device.

    The "hardest negative" of a query is its highest-scoring candidate that is not masked (not its
    positive, not another caption of its image), whether or not its hinge is active; under
    ``max_violation`` it is the negative whose hinge the loss takes whenever that hinge is active.
    Counts are 0-dim float tensors, so that sums over steps and ranks stay on the device.
    """

    gap_i2t: Tensor  # (b,) positive score - hardest negative caption's score, per image anchor; NaN: no negative
    gap_t2i: Tensor  # (b,) positive score - hardest negative image's score, per caption anchor; NaN: no negative
    active_hinges: Tensor  # hinge terms of the loss that are > 0 (both directions)
    hinges: Tensor  # hinge terms the loss sums: one per query with a negative (max_violation), else one per negative
    remote_hardest: Tensor  # hardest negatives (both directions) outside this rank's slice of the candidates
    queries: Tensor  # queries (both directions) that have a negative: the denominator of remote_hardest


# --------------------------------------------------------------------------------------------------
# Core: local anchors against global candidates (shared by the single-process and distributed paths)
# --------------------------------------------------------------------------------------------------


def _anchor_candidate_loss(
    anchor_images: Tensor,
    anchor_captions: Tensor,
    candidate_images: Tensor,
    candidate_captions: Tensor,
    not_negative: Tensor,
    margin: float,
    max_violation: bool,
    local_offset: int = 0,
    with_stats: bool = False,
) -> tuple[Tensor, HardNegativeStats | None]:
    """Sum of the hinge costs of ``b`` anchor pairs against ``n`` candidates.

    All inputs share one float dtype (float32 or float64).

    Args:
        anchor_images: ``(b, d)``, image ``k`` is the image query of anchor pair ``k``.
        anchor_captions: ``(b, d)``, caption ``k`` is the caption query of anchor pair ``k``
            (the positive of image ``k``).
        candidate_images: ``(n, d)``, images of the (global) batch; they are the
            candidates of the caption queries.
        candidate_captions: ``(n, d)``, captions of the (global) batch; the candidates of
            the image queries.
        not_negative: ``(b, n)`` bool, True where candidate ``j`` must not be used as a negative of
            anchor ``k`` (the positive itself, and other rows of the same image).
        margin: hinge margin.
        max_violation: True: hardest negative per query; False: sum over all negatives.
        local_offset: index of the first of this rank's own rows among the candidates (its slice
            is ``local_offset : local_offset + b``); only used for the stats.
        with_stats: also compute :class:`HardNegativeStats` (else None is returned for them).

    Returns:
        (0-dim tensor: image-query costs plus caption-query costs summed over the anchors, stats).
    """
    # One positive score per pair, used by both directions like the reference (which takes
    # S.diag() for both cost_s and cost_im). The row-wise dot product is local, so no gradient
    # for the positive has to travel through a gather.
    positive = (anchor_images * anchor_captions).sum(dim=1, keepdim=True)  # (b, 1)

    # Image queries over candidate captions (reference cost_s, row k).
    scores_i2t = anchor_images @ candidate_captions.t()  # (b, n)
    # Caption queries over candidate images (reference cost_im, column k, laid out as a row).
    scores_t2i = anchor_captions @ candidate_images.t()  # (b, n)

    # Clamp first, then zero the non-negatives, as the reference does (masked_fill_ after clamp):
    # masked entries get no gradient whatever their score.
    cost_s = (margin + scores_i2t - positive).clamp(min=0).masked_fill(not_negative, 0.0)
    cost_im = (margin + scores_t2i - positive).clamp(min=0).masked_fill(not_negative, 0.0)

    if max_violation:
        # max (not amax) like the reference: on ties the whole gradient goes to one index, and the
        # same one in the single-process and distributed paths since candidates keep their order.
        # A query whose candidates are all masked gets max(0, ..., 0) = 0.
        cost_s = cost_s.max(dim=1).values
        cost_im = cost_im.max(dim=1).values
    loss = cost_s.sum() + cost_im.sum()
    if not with_stats:
        return loss, None
    with torch.no_grad():
        stats = _hard_negative_stats(positive, scores_i2t, scores_t2i, cost_s, cost_im, not_negative,
                                     max_violation, local_offset)
    return loss, stats


def _hard_negative_stats(
    positive: Tensor,
    scores_i2t: Tensor,
    scores_t2i: Tensor,
    cost_s: Tensor,
    cost_im: Tensor,
    not_negative: Tensor,
    max_violation: bool,
    local_offset: int,
) -> HardNegativeStats:
    """The stats of :func:`_anchor_candidate_loss` from its own tensors (call under no_grad).

    The hardest negative is taken from the scores, not from the clamped costs: where no hinge is
    active the costs are all 0 and their argmax says nothing, while the scores still rank the
    candidates (and the warm-up, which sums all negatives, has no max at all). One masked max per
    direction over the (b, n) scores, no matrix product. No value goes to the host here.
    """
    has_negative = ~not_negative.all(dim=1)  # (b,)
    candidates = not_negative.shape[1]
    # This rank's own rows among the candidates: a hardest negative outside them came from another
    # worker's part of the gathered global batch.
    columns = torch.arange(candidates, device=not_negative.device)
    local = (columns >= local_offset) & (columns < local_offset + not_negative.shape[0])
    gaps, remote = [], []
    for scores in (scores_i2t, scores_t2i):
        hardest, index = scores.detach().masked_fill(not_negative, float("-inf")).max(dim=1)
        # masked_fill with a Python scalar, not torch.where with a NaN tensor: building that tensor
        # on a GPU would be a host-to-device copy, i.e. a sync, in every step.
        gaps.append((positive.detach().squeeze(1) - hardest).masked_fill(~has_negative, float("nan")))
        remote.append((has_negative & ~local[index]).sum())
    queries = 2 * has_negative.sum()
    # max_violation: cost_* are the per-query maxima, one hinge per query that has a negative.
    # Otherwise every (query, negative) pair is a hinge; masked entries are 0, never counted active.
    hinges = queries if max_violation else 2 * (~not_negative).sum()
    active = (cost_s > 0).sum() + (cost_im > 0).sum()
    dtype = positive.dtype
    return HardNegativeStats(
        gap_i2t=gaps[0], gap_t2i=gaps[1], active_hinges=active.to(dtype), hinges=hinges.to(dtype),
        remote_hardest=(remote[0] + remote[1]).to(dtype), queries=queries.to(dtype))


def _not_negative_mask(
    positive_index: Tensor,
    n_candidates: int,
    anchor_ids: Tensor | None,
    candidate_ids: Tensor | None,
) -> Tensor:
    """``(b, n)`` bool mask of the candidates that are not negatives of each anchor.

    With ids: candidates with the anchor's image id (this includes the positive itself, which has
    the same id). Without ids: only the positive, at ``positive_index[k]`` (the reference's
    diagonal).
    """
    if anchor_ids is not None and candidate_ids is not None:
        return anchor_ids.unsqueeze(1) == candidate_ids.unsqueeze(0)
    columns = torch.arange(n_candidates, device=positive_index.device)
    return positive_index.unsqueeze(1) == columns.unsqueeze(0)


def _at_least_float32(image_emb: Tensor, caption_emb: Tensor) -> tuple[Tensor, Tensor]:
    """Both embeddings in their common dtype, at least float32 (differentiable casts).

    bf16 spacing near 1.0 is ~0.004, coarse against a 0.2 margin, and the hardest-negative max
    would pick among rounding ties; so half-precision inputs are promoted to float32. float64
    inputs are not demoted (tests and numerical checks use them).
    """
    dtype = torch.promote_types(
        torch.promote_types(image_emb.dtype, caption_emb.dtype), torch.float32
    )
    return image_emb.to(dtype), caption_emb.to(dtype)


def _validate(image_emb: Tensor, caption_emb: Tensor, image_ids: Tensor | None) -> None:
    """Raise a clear error for shapes the loss cannot pair up."""
    if image_emb.dim() != 2 or caption_emb.dim() != 2:
        raise ValueError(
            "image_emb and caption_emb must be 2-D (batch, dim), got shapes "
            f"{tuple(image_emb.shape)} and {tuple(caption_emb.shape)}"
        )
    if image_emb.shape != caption_emb.shape:
        raise ValueError(
            "row i of image_emb and row i of caption_emb form a positive pair, so their shapes "
            f"must be equal; got {tuple(image_emb.shape)} and {tuple(caption_emb.shape)}"
        )
    if not (image_emb.is_floating_point() and caption_emb.is_floating_point()):
        raise TypeError(
            f"embeddings must be floating point, got {image_emb.dtype} and {caption_emb.dtype}"
        )
    if image_ids is not None:
        if image_ids.dim() != 1 or image_ids.shape[0] != image_emb.shape[0]:
            raise ValueError(
                f"image_ids must have shape ({image_emb.shape[0]},), got {tuple(image_ids.shape)}"
            )
        if image_ids.is_floating_point() or image_ids.is_complex():
            raise TypeError(f"image_ids must be an integer tensor, got {image_ids.dtype}")


# --------------------------------------------------------------------------------------------------
# Single process
# --------------------------------------------------------------------------------------------------


@overload
def hardest_negative_loss(
    image_emb: Tensor,
    caption_emb: Tensor,
    image_ids: Tensor | None = None,
    margin: float = DEFAULT_MARGIN,
    max_violation: bool = True,
    *,
    with_stats: Literal[False] = False,
) -> Tensor: ...


@overload
def hardest_negative_loss(
    image_emb: Tensor,
    caption_emb: Tensor,
    image_ids: Tensor | None = None,
    margin: float = DEFAULT_MARGIN,
    max_violation: bool = True,
    *,
    with_stats: Literal[True],
) -> tuple[Tensor, HardNegativeStats]: ...


def hardest_negative_loss(
    image_emb: Tensor,
    caption_emb: Tensor,
    image_ids: Tensor | None = None,
    margin: float = DEFAULT_MARGIN,
    max_violation: bool = True,
    *,
    with_stats: bool = False,
) -> Tensor | tuple[Tensor, HardNegativeStats]:
    """Matching loss of one process's batch (the reference ``ContrastiveLoss``).

    Args:
        image_emb: ``(B, D)`` l2-normalised image embeddings (any float dtype; bf16/fp16 are
            promoted to float32 before anything is computed).
        caption_emb: ``(B, D)`` l2-normalised caption embeddings; row ``i`` is the positive of
            image row ``i``.
        image_ids: optional ``(B,)`` integer ids of the images; rows with equal ids are never
            negatives of each other. None: only the diagonal is masked (the reference behaviour).
        margin: hinge margin (0.2 in the reference).
        max_violation: True: hardest negative per query (VSE++); False: sum over all negatives.
        with_stats: also return :class:`HardNegativeStats` (the loss is the same either way).

    Returns:
        0-dim tensor, float32 (float64 for float64 inputs), summed (not averaged) over the batch;
        with ``with_stats``, the tuple (loss, stats).
    """
    _validate(image_emb, caption_emb, image_ids)
    images, captions = _at_least_float32(image_emb, caption_emb)
    batch = images.shape[0]
    positive_index = torch.arange(batch, device=images.device)
    ids = None if image_ids is None else image_ids.to(images.device)
    not_negative = _not_negative_mask(positive_index, batch, ids, ids)
    loss, stats = _anchor_candidate_loss(
        images, captions, images, captions, not_negative, margin, max_violation, 0, with_stats
    )
    if with_stats:
        assert stats is not None  # computed when asked
        return loss, stats
    return loss


# --------------------------------------------------------------------------------------------------
# Distributed
# --------------------------------------------------------------------------------------------------


def _distributed_world(group: dist.ProcessGroup | None) -> int:
    """World size of ``group``, or 1 when torch.distributed is unavailable or not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group=group)


def gather_with_grad(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """All-gather ``tensor`` along dim 0 in rank order, with gradient flowing back to every rank.

    The backward is a reduce-scatter with SUM: the gradient arriving at rank ``r``'s ``tensor`` is
    the sum over all ranks of the gradient of their outputs w.r.t. rank ``r``'s slice. That is what
    a loss summed over ranks needs (each rank's loss depends on the other ranks' rows).

    Every rank must call this with the same shape (gloo aborts the process on a size mismatch;
    NCCL may hang), and every rank must later run the backward through it, since the backward is
    a collective too.

    Op choice: ``torch.distributed.nn.functional.all_gather``, the public autograd-aware gather
    that every torch of setup.py's range has and open_clip uses. Its backward reduce-scatters (NCCL)
    or emulates that with an all-to-all and a sum (gloo). torch 2.12 marks it deprecated in favour
    of ``torch.distributed._functional_collectives``, a private module whose autograd gather
    (``all_gather_single_autograd``) appeared only in 2.13 and is not in the GPU host's 2.11: the
    project stays on the public call and silences that one FutureWarning here
    (tests/test_public_apis.py keeps private torch modules out of the project).

    Args:
        tensor: ``(b, ...)`` tensor, same shape on every rank.
        group: process group; None means the default (world) group.

    Returns:
        ``(W * b, ...)`` tensor; rows ``r*b : (r+1)*b`` are rank ``r``'s. Without an initialised
        process group (or with one rank) ``tensor`` itself is returned.
    """
    if _distributed_world(group) == 1:
        return tensor
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.distributed\.nn\.functional\.all_gather is deprecated",
                                category=FutureWarning)
        parts = dist_nn.all_gather(tensor, group=group if group is not None else dist.group.WORLD)
    return torch.cat(parts, dim=0)


def _check_equal_local_batches(
    images: Tensor, group: dist.ProcessGroup | None, world: int
) -> None:
    """Raise on every rank if the local (batch, dim, bytes per element) differ across ranks.

    A mismatched all-gather aborts the process on gloo (and can hang on NCCL), so check with a
    3-int gather first; its cost is negligible next to the embedding gather. All ranks see the same
    gathered sizes, so they all raise (or none does) and none is left waiting in a collective.
    """
    local = torch.tensor(
        [images.shape[0], images.shape[1], images.element_size()],
        dtype=torch.int64,
        device=images.device,
    )
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=group)
    sizes = torch.stack(parts)
    if not bool((sizes == sizes[0]).all()):
        raise ValueError(
            "gathered_hardest_negative_loss needs the same local (batch, dim, dtype size) on every "
            f"rank; got {[tuple(s) for s in sizes.tolist()]} (rank order). The data reader must "
            "drop or pad uneven last batches."
        )


@overload
def gathered_hardest_negative_loss(
    image_emb: Tensor,
    caption_emb: Tensor,
    image_ids: Tensor | None = None,
    margin: float = DEFAULT_MARGIN,
    max_violation: bool = True,
    group: dist.ProcessGroup | None = None,
    *,
    with_stats: Literal[False] = False,
    check_sizes: bool = True,
) -> Tensor: ...


@overload
def gathered_hardest_negative_loss(
    image_emb: Tensor,
    caption_emb: Tensor,
    image_ids: Tensor | None = None,
    margin: float = DEFAULT_MARGIN,
    max_violation: bool = True,
    group: dist.ProcessGroup | None = None,
    *,
    with_stats: Literal[True],
    check_sizes: bool = True,
) -> tuple[Tensor, HardNegativeStats]: ...


def gathered_hardest_negative_loss(
    image_emb: Tensor,
    caption_emb: Tensor,
    image_ids: Tensor | None = None,
    margin: float = DEFAULT_MARGIN,
    max_violation: bool = True,
    group: dist.ProcessGroup | None = None,
    *,
    with_stats: bool = False,
    check_sizes: bool = True,
) -> Tensor | tuple[Tensor, HardNegativeStats]:
    """Matching loss of this rank's anchors against the GLOBAL batch of all ranks.

    Gathers the image and caption embeddings (with gradient) and the image ids (without) of all
    ranks, takes this rank's rows as anchors and every row of the global batch as candidates, and
    returns the sum over the local anchors. Hence:

    * sum over ranks of the returned losses == :func:`hardest_negative_loss` of the concatenated
      global batch (rank order);
    * parameter gradients averaged over ranks (what DDP/DeepSpeed do) == single-process gradients
      divided by the world size W. Scale the learning rate accordingly.

    Falls back to :func:`hardest_negative_loss` when torch.distributed is not initialised or the
    group has one rank.

    Args:
        image_emb: ``(B, D)`` l2-normalised image embeddings of this rank; B and D must be the same
            on every rank (checked, ValueError otherwise).
        caption_emb: ``(B, D)`` caption embeddings; row ``i`` is the positive of image row ``i``.
        image_ids: optional ``(B,)`` integer image ids; rows of the global batch with the anchor's
            id are not negatives (across ranks too). Either all ranks pass ids or none does.
            None: only the anchor's own positive is masked.
        margin: hinge margin.
        max_violation: True: hardest negative among all global candidates; False: sum over all.
        group: process group; None means the default group.
        with_stats: also return :class:`HardNegativeStats` of this rank's anchors; a hardest
            negative whose candidate row lies outside this rank's rows ``rank*B : (rank+1)*B``
            counts as remote (from another worker's part of the global batch).
        check_sizes: check that every rank has the same local (B, D, dtype) before gathering (a
            collective of 3 ints and a host sync). A caller that knows the shapes agree from host
            facts (a trainer whose batches all have the configured per-worker size, and one model)
            passes False, and the step waits for nothing.

    Returns:
        0-dim tensor, float32 (float64 for float64 inputs): this rank's share of the global loss;
        with ``with_stats``, the tuple (loss, stats).
    """
    world = _distributed_world(group)
    if world == 1:
        if with_stats:
            return hardest_negative_loss(image_emb, caption_emb, image_ids, margin, max_violation,
                                         with_stats=True)
        return hardest_negative_loss(image_emb, caption_emb, image_ids, margin, max_violation)
    _validate(image_emb, caption_emb, image_ids)
    # Cast before gathering: the loss is computed in float32 anyway (see _at_least_float32), and
    # the backward reduce-scatter then sums the other ranks' gradient contributions in float32
    # rather than in bf16.
    images, captions = _at_least_float32(image_emb, caption_emb)
    if check_sizes:
        _check_equal_local_batches(images, group, world)
    batch, dim = images.shape

    # One collective for both modalities instead of two: concatenate along the feature dim.
    gathered = gather_with_grad(torch.cat([images, captions], dim=1), group)
    candidate_images, candidate_captions = gathered.split(dim, dim=1)

    # all_gather concatenates in group-rank order, so this rank's rows start at rank * batch.
    rank = dist.get_rank(group=group)
    positive_index = torch.arange(rank * batch, (rank + 1) * batch, device=images.device)

    anchor_ids: Tensor | None = None
    candidate_ids: Tensor | None = None
    if image_ids is not None:
        anchor_ids = image_ids.to(device=images.device, dtype=torch.int64).contiguous()
        id_parts = [torch.empty_like(anchor_ids) for _ in range(world)]
        dist.all_gather(id_parts, anchor_ids, group=group)  # ids need no grad
        candidate_ids = torch.cat(id_parts)
    not_negative = _not_negative_mask(
        positive_index, candidate_images.shape[0], anchor_ids, candidate_ids
    )
    loss, stats = _anchor_candidate_loss(
        images,
        captions,
        candidate_images,
        candidate_captions,
        not_negative,
        margin,
        max_violation,
        rank * batch,
        with_stats,
    )
    if with_stats:
        assert stats is not None  # computed when asked
        return loss, stats
    return loss


# --------------------------------------------------------------------------------------------------
# Module wrapper
# --------------------------------------------------------------------------------------------------


class HardestNegativeLoss(nn.Module):
    """Thin module around the loss functions, holding margin and the hardest-negative switch.

    ``max_violation`` is a plain attribute so a trainer can start with the sum over all negatives
    (a warm-up) and flip it to True later. With ``gather=True`` it uses
    :func:`gathered_hardest_negative_loss`, which is the single-process loss when
    torch.distributed is not initialised.
    """

    def __init__(
        self,
        margin: float = DEFAULT_MARGIN,
        max_violation: bool = True,
        gather: bool = True,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.margin: float = margin
        self.max_violation: bool = max_violation
        self.gather: bool = gather
        self.group: dist.ProcessGroup | None = group

    def forward(
        self, image_emb: Tensor, caption_emb: Tensor, image_ids: Tensor | None = None
    ) -> Tensor:
        """Loss of the batch; see :func:`gathered_hardest_negative_loss`."""
        if self.gather:
            return gathered_hardest_negative_loss(
                image_emb, caption_emb, image_ids, self.margin, self.max_violation, self.group
            )
        return hardest_negative_loss(
            image_emb, caption_emb, image_ids, self.margin, self.max_violation
        )

    def extra_repr(self) -> str:
        return f"margin={self.margin}, max_violation={self.max_violation}, gather={self.gather}"
