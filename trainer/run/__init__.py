"""The run directory: what RUN_DIR holds, and the one place that reads and writes it (docs/run_layout.md).

RUN_DIR = {checkpoint.storage_path}/{checkpoint.run_name}, a local directory or an s3:// prefix,
reached through data_shards/storage.py's `Location` only. Each file of the run directory has one
module here, which spells how it is written and read; every other module asks it:

    layout.py          the names of every file and directory below, the shared JSON primitives
    lease.py           lease.json: the one trainer writing the run (taken and renewed by launch.py)
    config_yaml.py     config.yaml: the resolved configuration, written at launch, read back typed
    step_log.py        train_log.jsonl: the step log's field names, its writer and its readers
    records.py         one checkpoint's evaluation as one type, EvaluationRecord, in each of its
                       three files: metrics.json (written here, with eval_error.json), the
                       evaluations.jsonl line and best.json
    history.py         evaluations.jsonl: one line per evaluated checkpoint, never pruned
    best.py            best.json, and which checkpoint is the best (for pruning and the report)
    checkpoints.py     checkpoint_<step>/: the complete ones, in step order, with what was recorded
    train_state.py     train_state.json: where training stands (written last: the checkpoint is complete)
    retention.py       which checkpoints to delete, and deleting them (launch.py prunes)

The package imports nothing of trainer/ but trainer.config (the typed configuration) and itself:
the training side, the evaluator (trainer/evaluator/), the inference tools, the report and the
command lines build on it. Its modules are imported one by one (this file re-exports nothing), so
that a reader of one file loads no more than it needs.
"""
