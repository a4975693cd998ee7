"""Sharded, model-agnostic data for image-text matching (it imports nothing of model/ or trainer/).

    format.py        the shard format (one WebDataset sample per image) and the manifest
    convert.py       converters from the precomputed layout and bottom-up-attention TSVs
    verify.py        re-read and check a converted split
    storage.py       local and S3 locations (also the run directories of trainer/)
    synthetic.py     the synthetic world; synthesize.py its CLI
    reader.py        TrainReader / EvalReader, assembled from the stages below
    split.py         manifest and shard selection
    plan.py          the training epoch plan
    shard_reader.py  one shard: open, hash, tar members, samples, checks, bad-data policy
    caption_pool.py  the per-worker shuffle
    shared_rows.py   features in shared memory and reused batch buffers
    regions.py       region orders
    collate.py       tokens and batch assembly
    batches.py       TrainBatch / EvalBatch
"""
