"""The training side: what runs on Ray Train's workers, and what the driver prepares for them.

    worker.py       train_loop_per_worker: the worker's entry (Ray Train), its setup and resume
    loop.py         the epoch/step loop, top to bottom: schedule, step, record, checkpoint when due
    step.py         one step on the device: the data hand-off, forward, losses, backward, optimizer
    loss.py         the training loss of a rank (L_M over the gathered global batch x W, plus L_G)
    recorder.py     the step log line, the Ray metrics, the progress line, the collapse detector
    diagnostics.py  the hard-negative diagnostics of a logging interval and the collapse detector
    engine.py       the DeepSpeed engine of a worker (precision, ZeRO, compile) and the schedules
    optimizer.py    FlatAdam, the optimizer under ZeRO 0
    checkpoint.py   checkpoints: what they hold, how they reach storage, resuming, RNG states
    failures.py     which worker errors end a run at once, and the run's last line
    faults.py       fault injection for tests and drills (debug.*)
    data.py         the run's data: the synthetic dataset or shards, the vocabulary, storage options
    allocator.py    glibc malloc settings of the workers and the evaluation actor
    control.py      stopping on purpose: the driver's signals and stop request, drained nodes
    placement.py    whether the cluster has what the run asks for, before any worker starts

It imports trainer.config, trainer/run/ and trainer/evaluation/ of the rest of trainer/ (never
the evaluator, the inference tools or a command line: tests/test_import_layers.py).
"""
