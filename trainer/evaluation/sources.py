"""Similarity sources: where the blocks of query scores come from, one interface for embeddings
(products computed block by block, averaged over an ensemble) and for precomputed similarity
matrices (sliced block by block), so that the block-wise scorer (scorer.py) serves both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from trainer.evaluation.inputs import (
    check_finite,
    compute_dtype,
    member_names,
    resolve_device,
    to_tensor,
)
from trainer.evaluation.metrics import (
    CAPTIONS_PER_IMAGE,
    ArrayLike,
    DeviceLike,
    EvaluationInputError,
)

class SimilaritySource:
    """Where similarity scores come from: blocks of image rows, and each caption's positive.

    Both the embeddings path and the precomputed-similarities path go through this interface,
    so the ranking code is shared (:func:`all_ranks`).
    """

    num_images: int
    num_members: int
    dtype: torch.dtype
    device: torch.device

    @property
    def num_captions(self) -> int:
        return CAPTIONS_PER_IMAGE * self.num_images

    def image_query_scores(self, start: int, stop: int, out: torch.Tensor) -> None:
        """Write the scores of images ``start:stop`` against all captions into ``out``,
        shape ``(stop-start, 5N)``."""
        raise NotImplementedError

    def positive_scores(self) -> torch.Tensor:
        """Score of every caption j with its own image j // 5, shape ``(5N,)``."""
        raise NotImplementedError

    def pair_scores(self, images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """Scores of the pairs (``images[p]``, ``captions[p]``) (index tensors on the device),
        computed as :meth:`positive_scores` computes its pairs."""
        raise NotImplementedError

    def restrict(self, image_start: int, image_stop: int) -> SimilaritySource:
        """The same source limited to images ``image_start:image_stop`` and their captions."""
        raise NotImplementedError


class _EmbeddingSimilarities(SimilaritySource):
    """Scores as (averaged) products of image and caption embeddings, one block at a time."""

    def __init__(self, members: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.members = list(members)
        images, _ = self.members[0]
        self.num_images = images.shape[0]
        self.num_members = len(self.members)
        self.dtype = images.dtype
        self.device = images.device

    def image_query_scores(self, start: int, stop: int, out: torch.Tensor) -> None:
        images, captions = self.members[0]
        torch.mm(images[start:stop], captions.T, out=out)
        for images, captions in self.members[1:]:
            # Accumulated in place: an ensemble needs no block buffer per model.
            out.addmm_(images[start:stop], captions.T)
        if self.num_members > 1:
            out /= self.num_members

    def positive_scores(self) -> torch.Tensor:
        total = None
        for images, captions in self.members:
            # One (1 x D) @ (D x 5) product per image: N x 5 x D work, no (5N, D) temporary.
            grouped = captions.reshape(self.num_images, CAPTIONS_PER_IMAGE, -1)
            scores = torch.einsum("nd,nkd->nk", images, grouped).reshape(-1)
            total = scores if total is None else total.add_(scores)
        assert total is not None
        if self.num_members > 1:
            total /= self.num_members
        return total

    def pair_scores(self, images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        total = None
        for image_embeddings, caption_embeddings in self.members:
            scores = (image_embeddings[images] * caption_embeddings[captions]).sum(dim=1)
            total = scores if total is None else total.add_(scores)
        assert total is not None
        if self.num_members > 1:
            total /= self.num_members
        return total

    def restrict(self, image_start: int, image_stop: int) -> _EmbeddingSimilarities:
        caption_start, caption_stop = (CAPTIONS_PER_IMAGE * image_start, CAPTIONS_PER_IMAGE * image_stop)
        return _EmbeddingSimilarities(
            [
                (images[image_start:image_stop], captions[caption_start:caption_stop])
                for images, captions in self.members
            ]
        )


class _PrecomputedSimilarities(SimilaritySource):
    """Scores sliced from (N, 5N) similarity matrices, averaged over an ensemble.

    The matrices stay where they are (usually host memory); only one block of rows at a time is
    copied to the compute device and dtype, which bounds device memory as for embeddings.
    """

    def __init__(
        self,
        matrices: Sequence[torch.Tensor],
        labels: Sequence[str],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.matrices = list(matrices)
        self.labels = list(labels)
        self.num_images = self.matrices[0].shape[0]
        self.num_members = len(self.matrices)
        self.dtype = dtype
        self.device = device

    def _average(self, take: Callable[[torch.Tensor], torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        # The same element-wise operations, in the same order, for blocks and for positives, so
        # that a caption's positive equals its entry in the block bit for bit.
        out.copy_(take(self.matrices[0]))
        check_finite(out, f"{self.labels[0]}: similarity matrix")
        for label, matrix in zip(self.labels[1:], self.matrices[1:]):
            part = take(matrix).to(self.device, self.dtype)
            check_finite(part, f"{label}: similarity matrix")
            out += part
        if self.num_members > 1:
            out /= self.num_members
        return out

    def image_query_scores(self, start: int, stop: int, out: torch.Tensor) -> None:
        self._average(lambda sims: sims[start:stop], out)

    def positive_scores(self) -> torch.Tensor:
        captions = torch.arange(self.num_captions)
        images = captions // CAPTIONS_PER_IMAGE
        out = torch.empty(self.num_captions, dtype=self.dtype, device=self.device)
        return self._average(lambda sims: sims[images.to(sims.device), captions.to(sims.device)], out)

    def pair_scores(self, images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        out = torch.empty(images.shape[0], dtype=self.dtype, device=self.device)
        return self._average(lambda sims: sims[images.to(sims.device), captions.to(sims.device)], out)

    def restrict(self, image_start: int, image_stop: int) -> _PrecomputedSimilarities:
        caption_start, caption_stop = (CAPTIONS_PER_IMAGE * image_start, CAPTIONS_PER_IMAGE * image_stop)
        return _PrecomputedSimilarities(
            [sims[image_start:image_stop, caption_start:caption_stop] for sims in self.matrices],
            self.labels,
            self.dtype,
            self.device,
        )


def embedding_source(
    models: Sequence[tuple[ArrayLike, ArrayLike]],
    device: DeviceLike | None,
    names: Sequence[str] | None,
) -> _EmbeddingSimilarities:
    if len(models) == 0:
        raise EvaluationInputError("no models given: expected at least one (images, captions) pair")
    labels = member_names(names, len(models))
    members: list[tuple[torch.Tensor, torch.Tensor]] = []
    for label, model in zip(labels, models):
        if not isinstance(model, (tuple, list)) or len(model) != 2:
            raise EvaluationInputError(f"{label}: expected an (images, captions) pair")
        images = to_tensor(model[0], f"{label}: images")
        captions = to_tensor(model[1], f"{label}: captions")
        num_images, image_dim = images.shape
        if num_images == 0:
            raise EvaluationInputError(f"{label}: images is empty, shape {tuple(images.shape)}")
        if captions.shape[0] != CAPTIONS_PER_IMAGE * num_images:
            raise EvaluationInputError(
                f"{label}: captions must have {CAPTIONS_PER_IMAGE} x images rows: images has shape "
                f"{tuple(images.shape)}, so {CAPTIONS_PER_IMAGE * num_images} captions are "
                f"expected, but captions has shape {tuple(captions.shape)}"
            )
        if captions.shape[1] != image_dim:
            raise EvaluationInputError(
                f"{label}: images and captions must have the same dimension D: images has shape "
                f"{tuple(images.shape)}, captions has shape {tuple(captions.shape)}"
            )
        members.append((images, captions))

    first_label, (first_images, _) = labels[0], members[0]
    for label, (images, _) in zip(labels[1:], members[1:]):
        # The ensemble averages similarity matrices, which needs the same N. The same D is
        # required too: ensemble members are meant to be models of one architecture, and a
        # differing D almost always means a wrong file was passed.
        if images.shape != first_images.shape:
            what = "number of images N" if images.shape[0] != first_images.shape[0] else "dimension D"
            raise EvaluationInputError(
                f"ensemble members differ in {what}: {first_label} images have shape "
                f"{tuple(first_images.shape)}, {label} images have shape {tuple(images.shape)}"
            )

    all_tensors = [t for pair in members for t in pair]
    resolved_device = resolve_device(device, all_tensors)
    dtype = compute_dtype(all_tensors)
    moved = []
    for label, (images, captions) in zip(labels, members):
        # A no-op (no copy) for float32 CPU inputs evaluated on the CPU.
        images = images.to(resolved_device, dtype)
        captions = captions.to(resolved_device, dtype)
        check_finite(images, f"{label}: images")
        check_finite(captions, f"{label}: captions")
        moved.append((images, captions))
    return _EmbeddingSimilarities(moved)


def similarity_source(
    sims_list: Sequence[ArrayLike],
    device: DeviceLike | None,
    names: Sequence[str] | None,
) -> _PrecomputedSimilarities:
    if len(sims_list) == 0:
        raise EvaluationInputError("no similarity matrices given: expected at least one")
    labels = member_names(names, len(sims_list))
    matrices = [to_tensor(sims, f"{label}: similarity matrix") for label, sims in zip(labels, sims_list)]
    for label, sims in zip(labels, matrices):
        num_images, num_captions = sims.shape
        if num_images == 0 or num_captions != CAPTIONS_PER_IMAGE * num_images:
            raise EvaluationInputError(
                f"{label}: similarity matrix must have shape (N, {CAPTIONS_PER_IMAGE}N) with N >= 1 "
                f"(images x captions), got {tuple(sims.shape)}"
            )
    for label, sims in zip(labels[1:], matrices[1:]):
        if sims.shape != matrices[0].shape:
            raise EvaluationInputError(
                f"ensemble members differ in shape: {labels[0]} similarity matrix has shape "
                f"{tuple(matrices[0].shape)}, {label} has shape {tuple(sims.shape)}"
            )
    return _PrecomputedSimilarities(
        matrices, labels, compute_dtype(matrices), resolve_device(device, matrices)
    )
