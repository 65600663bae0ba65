"""Generation: parameters, model store, placement, the pipeline and the networks; nothing of HTTP."""
