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

    training/           what runs on Ray Train's workers: the worker's entry, the loop, the step,
                        the loss, the recorder, the DeepSpeed engine, checkpoints and resume,
                        failures, the run's data (training/__init__.py lists its modules)

The rooms import one way: evaluator -> inference -> evaluation and run; training beside them
(never the evaluator, inference or a command line); nothing imports a command line
(tests/test_import_layers.py).
"""
