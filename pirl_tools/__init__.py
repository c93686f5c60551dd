"""The product's tools: pirl-demo, pirl-bench, pirl-sft, pirl-init, pirl-success (they drive the plugin and both runtimes)."""
