"""Training and evaluation: composes model/ (the library) and data_shards/ (the data); monitoring/
is used from here, never the other way round.

    launch.py           the main job (`ray job submit -- python trainer/launch.py`): Ray Train driver
    config.py           the typed configuration (configs/*.yaml, --set overrides)
    data.py             the run's data: synthetic default, shards, vocabulary
    worker.py           the training loop on each Ray Train worker (DeepSpeed engine)
    run_checkpoint.py   saving and resuming checkpoints (DeepSpeed state, inference export)
    run_layout.py       the one owner of RUN_DIR: file names, records, evaluation history, retention
    run_lease.py        one trainer per run directory: the lease launch.py takes and renews
    diagnostics.py      hard-negative diagnostics per logging interval, the collapse detector
    failures.py         which worker errors end a run at once
    checkpoint_eval.py  evaluate and record one checkpoint, or every checkpoint of a run
    eval_worker.py      the Ray actor that evaluates checkpoints while training runs
    evaluation.py       recall protocols (1K-fold, 5K, ECCV Caption, CxC), the TF32 switch
    evaluate.py         CLI: a checkpoint, a run (--watch), or saved embeddings
    encode.py           CLI: embeddings of a split
    inference.py        opening a checkpoint for the inference CLIs (explain, retrieve, caption)
    retrieval.py        a split as a gallery of embeddings; text and image queries
    qualitative.py      the qualitative page of a checkpoint (top-3 retrievals, attention maps)
    attention_figure.py the Sec. 4.5 attention map of one image as a PNG
    explain.py          CLI: attention of the image representation over an image's regions
    retrieve.py         CLI: top-k images for texts, captions for images
    caption.py          CLI: the caption generator's greedy captions
    report.py           CLI: plots and summary of a run directory
    allocator.py        the allocator settings of the workers
"""
