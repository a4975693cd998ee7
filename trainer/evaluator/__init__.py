"""The evaluator: scoring the checkpoints of a run and recording what it found, at the top of the
chain evaluator -> trainer/inference/ -> trainer/evaluation/ and trainer/run/.

    checkpoint_eval.py  evaluating one checkpoint (dev and test protocols, the qualitative page),
                        recording the outcome (metrics.json, evaluations.jsonl and best.json, or
                        eval_error.json), evaluating every checkpoint of a run not yet evaluated
    actor.py            the Ray actor that evaluates a run's checkpoints while training goes on

Only the command lines (trainer/launch.py starts the actor; trainer/evaluate.py --checkpoint and
--watch) import it. Its modules are imported one by one (this file re-exports nothing; actor.py
needs Ray).
"""
