"""Generated gRPC stubs (``python -m pop_disagg.protos_build``); do not edit."""
