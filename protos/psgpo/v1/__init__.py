"""Generated protobuf and gRPC code for psgpo.v1 (regenerate with `make protos`)."""
