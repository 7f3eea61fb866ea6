"""psgpo wire contracts: generated protobuf/gRPC code lives in psgpo.v1."""
