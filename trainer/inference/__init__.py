"""Inference with a trained checkpoint: what the inference CLIs (explain.py, retrieve.py,
caption.py) and the evaluator (trainer/evaluator/) build on.

    checkpoint.py   opening a checkpoint (a run's checkpoint_<step>/ or an inference directory,
                    local or s3://) with its model, vocabulary and weights' identity
    arguments.py    the arguments the inference CLIs share, and the region order of a checkpoint's run
    encoding.py     encoding a sharded split in source order: the embeddings the evaluation ranks
    attention.py    the Sec. 4.5 attention over image records, fed as the run's reader fed them
    retrieval.py    a split encoded once as a gallery (cached beside the checkpoint), queried by text
                    or image
    qualitative.py  the qualitative page of a checkpoint: top-3 retrievals of fixed test queries and
                    their attention maps (written by the evaluator beside metrics.json)
    figures.py      an image's attention map as a PNG (matplotlib)

It builds on trainer/evaluation/ and trainer/run/ and never imports the evaluator or a CLI. Its
modules are imported one by one (this file re-exports nothing), so that a tool loads only what it
uses (figures.py, for one, loads matplotlib).
"""
