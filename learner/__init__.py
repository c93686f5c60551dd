"""Cloud side: gRPC service, rollout store, update loop, publisher, checkpoints, metrics."""
