"""Deployment and measurement: ONNX export with ORT parity (:mod:`.export`), ONNX Runtime sessions
(:mod:`.sessions`), interleaved timing (:mod:`.timing`), a model as a timed callable on a runtime
(:mod:`.runners`), the latency tables a latency budget needs (:mod:`.latency_tables`), and a dense/small pair
timed side by side (:mod:`.speed`)."""
