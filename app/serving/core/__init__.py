"""The typed core: request, result, events, errors, validation and the Service. Imports no protocol,
no FastAPI, KServe, gRPC or Prometheus."""
