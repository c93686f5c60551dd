"""Export of a ``pi_rl`` sampler for the edges and the learner alike: ONNX as one graph (``onnx_export``)
or split into prefix and velocity graphs (``split_export``), and TensorRT engines built from it (``trt_engine``)."""
