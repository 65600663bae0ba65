"""Everything that knows HTTP, KServe, gRPC or Prometheus."""
