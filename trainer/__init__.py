"""Training and evaluation: composes model/ (the library) and data_shards/ (the data); monitoring/
is used from here, never the other way round.

The command lines (`python trainer/<name>.py`, README "Command-line tools"); nothing imports them:

    launch.py           the main job (`ray job submit -- python trainer/launch.py`): Ray Train driver
    evaluate.py         a checkpoint, a run (--watch), or saved embeddings
    encode.py           embeddings of a split
    report.py           plots and summary of a run directory
    explain.py          attention of the image representation over an image's regions
    retrieve.py         top-k images for texts, captions for images
    caption.py          the caption generator's greedy captions

The rooms they build on, each package's __init__ saying what it owns; the imports run one way
(evaluator -> inference -> evaluation and run; tests/test_import_layers.py checks them):

    config.py           the typed configuration (configs/*.yaml, --set overrides)
    run/                the run directory: every file name, config.yaml, the train state, the one
                        evaluation record of metrics.json / evaluations.jsonl / best.json, which
                        checkpoint is the best, the step log's fields and reader, checkpoint listing
                        and retention, the lease
    evaluation/         recall protocols (1K-fold, 5K, ECCV Caption, CxC), tables, the TF32 switch
    inference/          opening a checkpoint, encoding a split, retrieval, the qualitative page,
                        attention figures; what the inference CLIs share
    evaluator/          evaluating and recording checkpoints; the Ray actor that does it while
                        training runs
    reporting/          what report.py reads, plots and writes

The training side (to move into training/; it imports neither the evaluator nor inference):

    worker.py           the training loop on each Ray Train worker (DeepSpeed engine)
    run_checkpoint.py   saving and resuming checkpoints (DeepSpeed state, inference export)
    diagnostics.py      hard-negative diagnostics per logging interval, the collapse detector
    failures.py         which worker errors end a run at once
    data.py             the run's data: synthetic default, shards, vocabulary
    allocator.py        the allocator settings of the workers
"""
