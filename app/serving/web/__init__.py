"""The HTTP app around the protocols: middleware, health, the API document, the page, and every touch
of KServe's internals (app.py)."""
