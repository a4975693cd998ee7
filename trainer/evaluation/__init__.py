"""Recall evaluation for image-text matching, as in VSRN (ICCV 2019) and VSE++.

The test sets pair every image with five captions: image ``i`` owns captions ``5i .. 5i+4``.
Given image and caption embeddings (or a precomputed similarity matrix ``sims[i, j] =
image_i . caption_j``), this package computes the retrieval ranks in both directions and the
recall metrics that papers report:

* image-to-text (i2t): each image queries all captions; its rank is the 0-based position of its
  best-placed own caption.
* text-to-image (t2i): each caption queries all images; its rank is the 0-based position of its
  image ``j // 5``.
* R@K (K = 1, 5, 10) is the percentage of ranks below K, ``medr = floor(median(ranks)) + 1``,
  ``meanr = mean(ranks) + 1``, and ``rsum`` is the sum of the six recalls.

Two protocols are supported: ``"all"`` ranks every image against every caption (the COCO 5K
test when given 5000 images, the Flickr30K 1K test), and ``"1k-5fold"`` splits the first 5000
images into five folds of 1000 (with their 5000 captions each), ranks each fold on its own and
averages the per-fold metrics (the COCO 1K result). An ensemble of models is evaluated by
averaging their similarity matrices before ranking.

Two more protocols rank the COCO 5K test split against extra annotated positives (from the
``eccv-caption`` package, data_shards/coco_annotations.py), located by the COCO ids of the
images and captions (:class:`GalleryIds`; without ids the standard 5K order is assumed):
``"eccv"`` gives ECCV Caption's mAP@R, R-Precision and R@1 and ``"cxc"`` CrissCrossed Captions'
R@1/5/10, in both directions and in percent, equal to the package's own functions on the same
rankings (annotated.py says how, and the tie rule). :func:`evaluate_embeddings_protocols`
computes ``"all"``, ``"eccv"`` and ``"cxc"`` in one pass over the similarity blocks.

The metric definitions are the ones of the reference ``evaluation.py`` (``i2t``, ``t2i``,
``evalrank``); the ranking is vectorized instead of looping over queries in Python. One pass
computes (or slices) the similarity matrix in blocks of image rows, whose size follows a memory
budget; a query's rank is the number of candidates that score strictly higher than its positive,
counted along the rows for i2t and accumulated down the columns for t2i, so every matrix product
is computed once for both directions. The reference's printed summary of the 5-fold results
mislabels rsum and the average recalls; here each metric is computed and named for what it is.

The package, one concern per module, in import order (each imports only those above it; the
names below are re-exported here, so ``from trainer.evaluation import ...`` is the API):

    metrics.py     the protocols, their pinned output keys, EvaluationInputError, metrics from ranks
    coco_ids.py    GalleryIds: the COCO ids the annotated protocols locate positives by
    inputs.py      input checks (2-D arrays, dtype, device, finite values), validate_protocol
    sources.py     similarity sources: blocks of scores from embeddings or similarity matrices
    scorer.py      the block-wise scorer (ranks of both directions in one pass), the precision switches
    annotated.py   the annotated protocols ECCV Caption and CxC, observers of the scorer's blocks
    protocols.py   the protocol drivers: evaluate_embeddings(_protocols), evaluate_similarities(_protocols)
    table.py       the text tables: format_table, results_table (one checkpoint's metrics.json)

It imports nothing of trainer/ outside itself (data_shards/coco_annotations.py gives the ids and
annotations); the evaluator (trainer/evaluator/), the CLIs and the inference tools build on it.

Example::

    from trainer.evaluation import evaluate_embeddings, evaluate_embeddings_protocols, format_table

    results = {p: evaluate_embeddings([(images, captions)], p) for p in ("1k-5fold", "all")}
    print(format_table(results))
    # COCO 5K in the standard order (else pass ids=GalleryIds.from_arrays(image_ids, caption_ids))
    print(format_table(evaluate_embeddings_protocols([(images, captions)], ["all", "eccv", "cxc"])))
"""

from trainer.evaluation.annotated import eccv_metrics
from trainer.evaluation.coco_ids import GalleryIds
from trainer.evaluation.inputs import validate_protocol
from trainer.evaluation.metrics import (
    ANNOTATED_PROTOCOLS,
    CAPTIONS_PER_IMAGE,
    CXC_KEYS,
    ECCV_KEYS,
    FOLD_IMAGES,
    FOLD_PROTOCOL_MIN_IMAGES,
    METRIC_KEYS,
    NUM_FOLDS,
    PROTOCOL_1K_5FOLD,
    PROTOCOL_ALL,
    PROTOCOL_CXC,
    PROTOCOL_ECCV,
    PROTOCOLS,
    RECALL_KS,
    RECALL_PROTOCOLS,
    ArrayLike,
    DeviceLike,
    EvaluationInputError,
    RecallMetrics,
    metrics_from_ranks,
    recall_at_k,
)
from trainer.evaluation.protocols import (
    evaluate_embeddings,
    evaluate_embeddings_protocols,
    evaluate_similarities,
    evaluate_similarities_protocols,
)
from trainer.evaluation.scorer import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    choose_block_size,
    embedding_ranks,
    full_float32_matmul,
    i2t_ranks,
    set_tf32,
    similarity_ranks,
    t2i_ranks,
)
from trainer.evaluation.table import format_table, results_table

__all__ = [
    "ANNOTATED_PROTOCOLS",
    "CAPTIONS_PER_IMAGE",
    "CXC_KEYS",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "ECCV_KEYS",
    "FOLD_IMAGES",
    "FOLD_PROTOCOL_MIN_IMAGES",
    "METRIC_KEYS",
    "NUM_FOLDS",
    "PROTOCOLS",
    "PROTOCOL_1K_5FOLD",
    "PROTOCOL_ALL",
    "PROTOCOL_CXC",
    "PROTOCOL_ECCV",
    "RECALL_KS",
    "RECALL_PROTOCOLS",
    "ArrayLike",
    "DeviceLike",
    "EvaluationInputError",
    "GalleryIds",
    "RecallMetrics",
    "choose_block_size",
    "eccv_metrics",
    "embedding_ranks",
    "evaluate_embeddings",
    "evaluate_embeddings_protocols",
    "evaluate_similarities",
    "evaluate_similarities_protocols",
    "format_table",
    "full_float32_matmul",
    "i2t_ranks",
    "metrics_from_ranks",
    "recall_at_k",
    "results_table",
    "set_tf32",
    "similarity_ranks",
    "t2i_ranks",
    "validate_protocol",
]
