"""Work between the Service and the engine: the queue and job store interfaces (`base.py`), their
in-process implementations, and the worker that feeds the pipeline."""
