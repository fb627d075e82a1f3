"""Training: the loop shared by the search and the retrain, objectives and streamed batches (:mod:`.loop`),
checkpoints (:mod:`.checkpoint`) and ``torch.distributed`` helpers (:mod:`.distributed`)."""
