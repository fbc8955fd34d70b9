"""The serving edge: Ray actor shells, the router, protobuf conversion and the gRPC servicer."""
