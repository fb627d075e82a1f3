"""Capture: a model and its example inputs → a GraphModule (``torch.export``, non-strict, dynamic batch and
sequence), with the inputs normalised and the capture's facts kept on the graph (:mod:`.program`)."""
