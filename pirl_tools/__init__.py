"""The product's tools: pirl-demo, pirl-bench, pirl-sft, pirl-init (they drive the plugin and both runtimes)."""
