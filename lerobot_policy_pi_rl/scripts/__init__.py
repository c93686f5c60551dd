"""Console entry points: pirl-sft, pirl-bench, pirl-demo."""
