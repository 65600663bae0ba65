"""The server around the engine. Read the folders in the order a request travels them:

protocols/ (v1, jobs, v2 REST and gRPC, OpenAI: wire form <-> typed request and result) -> core/ (the
typed request, result, events, errors, validation, and the Service every protocol calls) -> queue/ (the
work queue and job store interfaces, their in-process implementations, the batching worker) -> the engine.
web/ is the HTTP app around the protocols (middleware, health, the API document, the page);
observability/ holds metrics and logs; model.py is the KServe Model that assembles it all.
"""
