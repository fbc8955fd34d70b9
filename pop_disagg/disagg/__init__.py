"""Disaggregated prefill/decode workers and the KV transfer between them (no Ray, no gRPC)."""
