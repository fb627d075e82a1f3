"""Your model back: the caller's own class rebuilt at the cut's widths and verified against the graph
(:mod:`.rebuild`), what a class can express (:mod:`.class_limits`), and saving/loading it
(:mod:`.pretrained`)."""
