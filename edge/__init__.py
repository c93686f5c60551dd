"""Robot side: control loop, inference, rollout spool and uploader, policy subscriber, metrics."""
